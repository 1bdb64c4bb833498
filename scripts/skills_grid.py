"""Write docs/skills_grid.png: one example per generated skill, labelled with name, question, answer.

    python scripts/skills_grid.py [--seed 0] [--size 64] [--out docs/skills_grid.png]
"""

from __future__ import annotations

import argparse
import textwrap
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from lmm_ray import skills

ROOT = Path(__file__).resolve().parents[1]

COLS, TEXT_H, PAD = 5, 92, 8


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--out", default=str(ROOT / "docs" / "skills_grid.png"))
    args = ap.parse_args()

    names = skills.target_skills() + skills.heldout_skills()
    zoom = max(1, 192 // args.size)
    tile_w = args.size * zoom + 2 * PAD
    tile_h = args.size * zoom + TEXT_H + 2 * PAD
    rows = -(-len(names) // COLS)
    sheet = Image.new("RGB", (COLS * tile_w, rows * tile_h), (235, 235, 235))
    d = ImageDraw.Draw(sheet)
    font, bold = ImageFont.load_default(size=11), ImageFont.load_default(size=13)
    for i, name in enumerate(names):
        spec = skills.get_skill(name)
        s = skills.generate(name, 1, seed=args.seed, image_size=args.size)[0]
        x0, y0 = (i % COLS) * tile_w + PAD, (i // COLS) * tile_h + PAD
        sheet.paste(s.image.resize((args.size * zoom,) * 2, Image.NEAREST), (x0, y0))
        y = y0 + args.size * zoom + 3
        d.text((x0, y), f"{name} ({spec.kind})", font=bold, fill=(0, 0, 0))
        y += 16
        for line in textwrap.wrap(s.question, 30)[:4]:
            d.text((x0, y), line, font=font, fill=(40, 40, 40))
            y += 13
        d.text((x0, y), f"-> {s.answer}", font=bold, fill=(180, 0, 0))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    sheet.save(args.out)
    print(f"wrote {args.out} ({len(names)} skills)")


if __name__ == "__main__":
    main()
