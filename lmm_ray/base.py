"""The embedded base model: a tiny LMM pre-trained locally on the held-out general skills.

Forgetting needs something to forget. `build` pre-trains a family's tiny model on the held-out
skills only (never on a target skill) and stores it as a `save_pretrained` folder in a cache
directory keyed by a hash of everything that determines it: family, sizes, skills, the source
of the generators and tokenizer, the schedule and the seed. `ensure("base:<family>[@preset]")`
returns that folder, building it on first use.

Shipped bases. The quickstart's base is in the package (`lmm_ray/bases/<family>-<preset>/`, ~6 MB)
with a manifest holding its `key` and the sha256 of every file: building it costs ~10-20 min
of a core, which on a fresh clone is more than the whole sweep after it, while a few MB in the
repository cost nothing to the user. `ensure` copies the shipped folder into the cache (the
package folder may be read-only, and the cache is what every loader already reads) when its key
equals the current `key()`; otherwise it builds as before and says why. `rebuild` is the
one-command check that the shipped weights are what this code trains (bit for bit on the same
machine and torch build; across CPUs float reductions may differ, docs/base_models.md).

A folder is complete only when its `manifest.json` (written last, with a hash of every file)
verifies; anything else (an interrupted build, a deleted or edited file) is rebuilt, never loaded.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from lmm_ray.families import TinySize

MANIFEST = "manifest.json"
SHIPPED_ROOT = Path(__file__).parent / "bases"
INFO = "base_info.json"
# How to refresh a shipped base after a change to its key's inputs (named by the tests' failure).
RESHIP = "make base-ship   (= lmm-ray base build --preset {preset} --ship)"


@dataclass(frozen=True)
class Preset:
    size: TinySize
    steps: int
    batch_size: int
    lr: float
    n_per_skill: int  # generated training samples per held-out skill
    # Skills drawn more often: left/right and "is there a <shape>?" need spatial and text-image
    # binding, which this tiny Qwen2.5-VL learns slowest (no absolute positions in its ViT).
    weights: tuple = (("position", 2.0), ("presence", 2.0))
    warmup_ratio: float = 0.05
    weight_decay: float = 0.01
    seed: int = 0
    minutes: float = 1.0  # typical build time on a 2-core CPU (said when a build starts)
    eval_n: int = 100


_TINY = TinySize(hidden=128, layers=4, intermediate=384, vision_hidden=96, vision_layers=3)
PRESETS: dict[str, Preset] = {
    # Sized so the build fits 10 minutes on 2 cores and held-out skills reach >= 90%; lower rates
    # learned faster than higher ones here (docs/base_models.md has the measurements).
    "quickstart": Preset(_TINY, steps=2800, batch_size=32, lr=5e-4, n_per_skill=800, minutes=10),
    # For tests and CI: about a minute, clearly above chance on held-out skills.
    "ci": Preset(_TINY, steps=300, batch_size=32, lr=1e-3, n_per_skill=250, minutes=1.5, eval_n=50),
}
# Which presets each family offers; the first is what `base:<family>` means.
FAMILY_PRESETS: dict[str, tuple[str, ...]] = {
    "qwen2_5_vl": ("quickstart", "ci"),
    "llava_onevision": ("ci", "quickstart"),
    "internvl": ("ci", "quickstart"),
    "llava": ("ci", "quickstart"),
}


def cache_root() -> Path:
    return Path(os.environ.get("LMM_RAY_CACHE", Path.home() / ".cache" / "lmm_ray")) / "base"


def parse_ref(ref: str) -> tuple[str, str]:
    """'base:qwen2_5_vl@ci' -> ('qwen2_5_vl', 'ci'); no preset -> the family's default."""
    from lmm_ray.families import get_family

    body = ref.split(":", 1)[1] if ref.startswith("base:") else ref
    family, _, preset = body.partition("@")
    get_family(family)  # names the valid families on a miss
    preset = preset or FAMILY_PRESETS.get(family, ("ci",))[0]
    if preset not in PRESETS:
        raise ValueError(f"unknown base preset {preset!r} in {ref!r}; valid presets: {', '.join(PRESETS)}")
    return family, preset


# Bump when a change to the model builders (families.py), the training step (optim.py) or the
# encoding (data.py) changes what a build produces; generator and tokenizer code is hashed below.
BASE_VERSION = 1


def _source_hash() -> str:
    """Hash of the code that determines the data and the tokenizer: the skill generators and tokenizer.py."""
    import lmm_ray

    root = Path(lmm_ray.__file__).parent
    h = hashlib.sha256()
    for rel in ["tokenizer.py", *sorted(str(p.relative_to(root)) for p in (root / "skills").glob("*.py"))]:
        if rel.endswith(("loaders.py", "hub.py", "benchmarks.py")):  # real-data loading never touches the base
            continue
        h.update(rel.encode())
        h.update((root / rel).read_bytes())
    return h.hexdigest()[:16]


def key(family: str, preset: str) -> dict:
    from lmm_ray import skills

    import transformers

    p = {k: v for k, v in asdict(PRESETS[preset]).items() if k != "minutes"}  # a message, not part of the build
    return {"family": family, "preset": preset, **p, "skills": skills.heldout_skills(),
            "source": _source_hash(), "version": BASE_VERSION, "transformers": transformers.__version__.split(".")[0]}


def folder(family: str, preset: str) -> Path:
    k = key(family, preset)
    digest = hashlib.sha256(json.dumps(k, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return cache_root() / f"{family}-{preset}-{digest}"


def _file_hashes(path: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir()) if p.is_file() and p.name != MANIFEST}


def verify(path: Path) -> str | None:
    """None if the folder is a complete build; else why not."""
    if not path.is_dir():
        return "not built"
    man = path / MANIFEST
    if not man.is_file():
        return "no manifest (interrupted build?)"
    try:
        expected = json.loads(man.read_text())["files"]
    except (ValueError, KeyError):
        return "unreadable manifest"
    actual = _file_hashes(path)
    if expected != actual:
        missing = sorted(set(expected) - set(actual))
        changed = sorted(n for n in expected if n in actual and expected[n] != actual[n])
        return f"files missing {missing} or changed {changed}"
    return None


def shipped(family: str, preset: str) -> Path:
    return SHIPPED_ROOT / f"{family}-{preset}"


def _plain(obj):
    """A key as JSON reads it back (tuples become lists), so a manifest's key compares equal."""
    return json.loads(json.dumps(obj, default=str))


def shipped_problem(family: str, preset: str) -> str | None:
    """None if the package ships this base for the current code; else why it cannot be used."""
    path = shipped(family, preset)
    if not (path / MANIFEST).is_file():
        return "none shipped"
    try:
        shipped_key = json.loads((path / MANIFEST).read_text())["key"]
    except (ValueError, KeyError):
        return "the shipped manifest has no key"
    current = _plain(key(family, preset))
    if shipped_key != current:
        diff = sorted(k for k in set(current) | set(shipped_key) if current.get(k) != shipped_key.get(k))
        return (f"the shipped copy was built from other code or settings (differs in: {', '.join(diff)}); "
                f"reship it with: {RESHIP.format(preset=preset)}")
    problem = verify(path)
    return None if problem is None else f"the shipped copy is damaged: {problem}"


def _install_shipped(family: str, preset: str, path: Path) -> None:
    """Copy the shipped folder into the cache: write a temporary folder, rename it into place."""
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(shipped(family, preset), tmp)
    for f in tmp.iterdir():  # the package's modes (read-only installs) are not the cache's
        f.chmod(0o644)
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)


@contextlib.contextmanager
def _lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(str(path) + ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # one build at a time, also across Ray workers
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def ensure(ref: str, *, force: bool = False, quiet: bool = False) -> Path:
    """The cached folder of a base model, built first if missing or incomplete."""
    family, preset = parse_ref(ref)
    path = folder(family, preset)
    if not force and verify(path) is None:
        return path
    with _lock(path):
        problem = verify(path)
        if not force and problem is not None:
            ship_problem = shipped_problem(family, preset)
            if ship_problem is None:
                _install_shipped(family, preset, path)
                if verify(path) is None:
                    return path
                ship_problem = f"the copy in the cache does not verify: {verify(path)}"
            if ship_problem != "none shipped":
                problem = f"{problem}; not using the shipped base: {ship_problem}"
        if force or problem is not None:
            if not quiet:
                p = PRESETS[preset]
                why = "rebuilding on request" if force else ("building it" if problem == "not built" else f"rebuilding it: {problem}")
                print(f"[lmm_ray] base:{family}@{preset} is not cached ({why}). Pre-training a tiny {family} on the "
                      f"held-out skills ({p.steps} steps); this usually takes about {p.minutes:g} min on 2 CPU cores. "
                      f"Cache: {path}", file=sys.stderr, flush=True)
            build(family, preset, path, progress=not quiet)
    return path


class _EveryTenth:
    """Progress for a log rather than a terminal (a redirected stderr, a Ray worker whose output
    reaches the driver line by line): one line per 10 % of the steps instead of a bar per update."""

    def __init__(self, total: int, desc: str, enabled: bool):
        self.total, self.desc, self.enabled = total, desc, enabled
        self.n, self.next, self.t0 = 0, max(1, round(total / 10)), time.time()

    def step(self, loss: float) -> None:
        self.n += 1
        if self.enabled and (self.n >= self.next or self.n == self.total):
            print(f"{self.desc}: {100 * self.n // self.total}% ({self.n}/{self.total} steps), loss {loss:.3f}, "
                  f"{time.time() - self.t0:.0f} s", file=sys.stderr, flush=True)
            while self.next <= self.n:
                self.next += max(1, round(self.total / 10))

    def close(self) -> None:
        pass


def build(family: str, preset: str, path: Path, progress: bool = True) -> dict:
    """Pre-train and save. Writes into a temporary folder and renames it into place when complete."""
    import torch
    from tqdm import tqdm

    from lmm_ray import data, evaluate, models, skills
    from lmm_ray.optim import train_stage

    p = PRESETS[preset]
    t0 = time.time()
    loaded = models.build_tiny(family, p.size, seed=p.seed)
    heldout = skills.heldout_skills()
    pool = []
    weights = dict(p.weights)
    for name in heldout:
        n = round(p.n_per_skill * weights.get(name, 1.0))
        pool += skills.generate(name, n, seed=p.seed + 1, image_size=p.size.image_size)
    encs = data.encode_train(loaded.processor, pool)
    desc = f"base:{family}@{preset}"
    if sys.stderr.isatty():  # a bar that updates in place
        bar = tqdm(total=p.steps, desc=desc, unit="step", disable=not progress, file=sys.stderr, mininterval=2)
        on_step = lambda s, loss: (bar.update(1), bar.set_postfix(loss=f"{loss:.3f}", refresh=False))  # noqa: E731
    else:
        bar = _EveryTenth(p.steps, desc, progress)
        on_step = lambda s, loss: bar.step(loss)  # noqa: E731
    stats = train_stage(loaded.model, encs, steps=p.steps, lr=p.lr, batch_size=p.batch_size, pad_id=loaded.tokenizer.pad_token_id,
                        seed=p.seed, stage=0, warmup_ratio=p.warmup_ratio, weight_decay=p.weight_decay, on_step=on_step)
    bar.close()
    train_seconds = time.time() - t0
    loaded.model.eval()
    eval_sets = evaluate.generated_eval_sets(loaded.processor, skills.target_skills() + heldout, p.eval_n, seed=0, image_size=p.size.image_size)
    report = evaluate.evaluate(loaded.model, loaded.processor, eval_sets)
    info = {"ref": f"base:{family}@{preset}", "key": key(family, preset), "build_seconds": round(train_seconds, 1),
            "final_loss": stats.loss_last, "torch": torch.__version__, "metrics": report.metrics(),
            "chance": {n: r.chance for n, r in report.results.items()}}
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    loaded.save(tmp)
    (tmp / "base_info.json").write_text(json.dumps(info, indent=1, default=str))
    (tmp / MANIFEST).write_text(json.dumps({"files": _file_hashes(tmp)}, indent=1))
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)
    return info


def ship(ref: str) -> Path:
    """Copy the cached build of `ref` (built first if needed) into the package, with a manifest
    holding its key: what `ensure` then uses instead of building."""
    family, preset = parse_ref(ref)
    src = folder(family, preset)
    if verify(src) is not None:
        src = ensure(ref, force=True)  # never ship a copy that came from the shipped one
    dst = shipped(family, preset)
    shutil.rmtree(dst, ignore_errors=True)
    dst.mkdir(parents=True)
    for f in sorted(src.iterdir()):
        if f.is_file() and f.name != MANIFEST:
            shutil.copyfile(f, dst / f.name)
    (dst / MANIFEST).write_text(json.dumps({"key": _plain(key(family, preset)), "files": _file_hashes(dst)}, indent=1) + "\n")
    return dst


def rebuild(ref: str) -> tuple[bool, list[str]]:
    """Build `ref` afresh into a temporary folder and compare every file's sha256 with the shipped
    copy (or, if none is shipped, the cached build). Returns (all equal, one line per file).
    base_info.json must agree on what the build is (key, final loss); its evaluation report and
    build time are said, not compared: evaluate.py is not part of the key, so a later change to
    the evaluation changes the report of the same weights."""
    import tempfile

    family, preset = parse_ref(ref)
    ref_dir = shipped(family, preset) if (shipped(family, preset) / MANIFEST).is_file() else folder(family, preset)
    expected = json.loads((ref_dir / MANIFEST).read_text())["files"]
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "build"
        build(family, preset, out, progress=True)
        actual = _file_hashes(out)
        lines, ok = [], True
        for name in sorted(set(expected) | set(actual)):
            note = ""
            if name == INFO and name in actual:
                new, old = json.loads((out / INFO).read_text()), json.loads((ref_dir / INFO).read_text())
                same = all(_plain(new.get(k)) == _plain(old.get(k)) for k in ("key", "final_loss"))
                report = sorted(k for k in set(new) | set(old) if k not in ("key", "final_loss", "build_seconds")
                                and new.get(k) != old.get(k))
                note = f" (key and final loss compared; report differs in {report})" if report else ""
            else:
                same = expected.get(name) == actual.get(name)
            ok &= same
            lines.append(f"{'match   ' if same else 'MISMATCH'} {name} {actual.get(name, 'missing')[:16]}{note}")
    lines.append(f"compared with {ref_dir}")
    return ok, lines


def info(ref: str) -> dict:
    return json.loads((ensure(ref) / "base_info.json").read_text())
