"""`lmm-ray` verbs. Thin: parse arguments, call the module that owns the work, print.

Errors a user can fix (bad config, unknown recipe, missing file) print one clear message and
exit with code 2, before anything expensive starts.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

EXIT_USAGE = 2


class UserError(Exception):
    """An error the user can fix; printed without a traceback."""


def _fmt_int(n: int) -> str:
    return f"{n:,}"


# ---------------------------------------------------------------------------------------------
# recipes


def cmd_recipes(a) -> int:
    from lmm_ray import families, models, recipes

    custom = recipes.load_recipe_file(a.recipe_file) if a.recipe_file else None
    if a.model:
        fam, cfg = models.model_config(a.model)
        model = models.meta_model(fam, cfg)
    else:
        fam = families.get_family(a.family)
        model = models.build_tiny(a.family).model
    table = recipes.audit(model, fam, a.recipe or None, custom)
    if a.json:
        print(json.dumps(table, indent=None if a.compact else 2))
        return 0
    roles = [r for r in families.ROLE_ORDER if any(r in row["roles"] for row in table.values())]
    roles += sorted({r for row in table.values() for r in row["roles"]} - set(roles))
    head = ["recipe", "trainable", "share"] + roles
    rows = [
        [name, _fmt_int(row["trainable"]), f"{100 * row['trainable'] / row['total']:.2f}%"]
        + [_fmt_int(row["roles"].get(r, 0)) if row["roles"].get(r) else "-" for r in roles]
        for name, row in table.items()
    ]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    total = next(iter(table.values()))["total"]
    print(f"# {a.model or 'tiny:' + a.family} ({fam.name}): {_fmt_int(total)} parameters")
    for r in [head, *rows]:
        print("  ".join(str(x).rjust(w) if i else str(x).ljust(w) for i, (x, w) in enumerate(zip(r, widths))))
    return 0


# ---------------------------------------------------------------------------------------------
# eval


def _skill_names(arg: str | None) -> list[str]:
    from lmm_ray import skills

    names = list(dict.fromkeys(s.strip() for s in arg.split(",") if s.strip())) if arg else (
        skills.target_skills() + skills.heldout_skills())
    if not names:
        raise UserError("--skills names no skill")
    for n in names:
        skills.get_skill(n)  # unknown name -> UnknownName listing the valid ones (exit 2)
    return names


def cmd_eval(a) -> int:
    from lmm_ray import evaluate, models

    names = _skill_names(a.skills)  # before loading anything: a typo costs nothing
    if a.n < 1 or a.batch_size < 1:
        raise UserError("--n and --batch-size must be >= 1")
    loaded = models.load_model(a.model)
    sets = evaluate.generated_eval_sets(loaded.processor, names, a.n, a.seed, a.image_size)
    report = evaluate.evaluate(loaded.model, loaded.processor, sets, batch_size=a.batch_size)
    metrics = report.metrics()
    if a.json:
        print(json.dumps({"model": a.model, "n": a.n, "metrics": metrics}))
        return 0
    print(f"# {a.model}: {a.n} samples per skill, eval seed {evaluate.eval_seed(a.seed)} (accuracy in pp)")
    w = max(len(n) for n in names + ["held-out skills"]) - 2
    for kind, title in (("target", "target skills"), ("heldout", "held-out skills")):
        rows = [r for r in report.results.values() if r.kind == kind]
        if not rows:
            continue
        print(f"{title:<{w + 2}}  {'acc':>6}  {'chance':>6}")
        for r in rows:
            chance = f"{r.chance:6.1f}" if r.chance is not None else f"{'?':>6}"
            print(f"  {r.skill:<{w}}  {r.acc:6.1f}  {chance}")
        print(f"  {'mean':<{w}}  {metrics[kind + '/mean_acc']:6.1f}")
    if report.probe:
        print("probe on held-out prompts (base: none, so no counting bias / KL)")
        for k, v in report.probe.items():
            unit = " nats" if k.endswith("entropy") else " pp" if k.endswith("acc") or "acc_" in k else ""
            print(f"  {k.removeprefix('probe/'):<22}  {v:8.4g}{unit}")
    return 0


# ---------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lmm-ray", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)

    r = sub.add_parser("recipes", help="trainable parameters of every recipe, per role")
    g = r.add_mutually_exclusive_group()
    g.add_argument("--family", default="qwen2_5_vl", help="tiny model of this family (default qwen2_5_vl)")
    g.add_argument("--model", help="a model reference: hub id, local folder, tiny:<family>, base:<family>")
    r.add_argument("--recipe", action="append", help="only this recipe (repeatable)")
    r.add_argument("--recipe-file", help="YAML file of user-defined recipes to include")
    r.add_argument("--json", action="store_true", help="print {recipe: {trainable, total, roles}} as JSON")
    r.add_argument("--compact", action="store_true", help=argparse.SUPPRESS)
    r.set_defaults(fn=cmd_recipes)

    e = sub.add_parser("eval", help="accuracy per generated skill (pp) and the counting-bias probe")
    e.add_argument("--model", required=True, help="hub id, local folder, tiny:<family>, base:<family>")
    e.add_argument("--skills", help="comma-separated skill names (default: every generated target and held-out skill)")
    e.add_argument("--n", type=int, default=64, help="samples per skill (default 64)")
    e.add_argument("--batch-size", type=int, default=64, help="prompts per generate call (default 64)")
    e.add_argument("--seed", type=int, default=0, help="evaluation stream; samples come from seed 10000+S")
    e.add_argument("--image-size", type=int, default=None, help="image side in pixels (default: the skills' default)")
    e.add_argument("--json", action="store_true", help='print one JSON object {"model", "n", "metrics"}')
    e.set_defaults(fn=cmd_eval)

    for register in _EXTRA_VERBS:
        register(sub)
    return p


# Other modules' verbs register here (keeps this file thin and each verb next to its code).
_EXTRA_VERBS: list = []


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from lmm_ray.recipes import RecipeError
    from lmm_ray.registry import UnknownName

    args = build_parser().parse_args(argv)
    try:
        return int(args.fn(args) or 0)
    except (UserError, RecipeError, UnknownName, FileNotFoundError) as e:
        print(f"lmm-ray {args.cmd}: error: {e}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
