"""Skills: generated (targets and held-out) and loaded from real datasets, one Sample schema.

A generated skill is a function `(rng: random.Random, image_size: int) -> Sample` registered
with `@skill(name, kind="target" | "heldout", answer_type=...)`. `generate(name, n, seed)`
draws n samples deterministically for a seed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable

from lmm_ray.registry import Registry
from lmm_ray.skills.schema import ANSWER_TYPES, Sample

DEFAULT_IMAGE_SIZE = 64


@dataclass(frozen=True)
class SkillSpec:
    name: str
    kind: str  # "target" or "heldout"
    answer_type: str
    fn: Callable[[random.Random, int], Sample]
    description: str = ""
    study_role: str = ""  # the study's dataset this skill stands in for (targets)


SKILLS: Registry[SkillSpec] = Registry("skill")


def skill(name: str, *, kind: str, answer_type: str, description: str = "", study_role: str = ""):
    if kind not in ("target", "heldout"):
        raise ValueError(f"skill {name!r}: kind must be 'target' or 'heldout', not {kind!r}")
    if answer_type not in ANSWER_TYPES:
        raise ValueError(f"skill {name!r}: answer_type must be one of {ANSWER_TYPES}")

    def deco(fn):
        SKILLS.register(name, SkillSpec(name, kind, answer_type, fn, description, study_role))
        return fn

    return deco


def _load_generators() -> None:
    # Importing the generator modules registers their skills.
    from lmm_ray.skills import generated  # noqa: F401


def get_skill(name: str) -> SkillSpec:
    _load_generators()
    return SKILLS.get(name)


def target_skills() -> list[str]:
    _load_generators()
    return [n for n, s in SKILLS.items() if s.kind == "target"]


def heldout_skills() -> list[str]:
    _load_generators()
    return [n for n, s in SKILLS.items() if s.kind == "heldout"]


def generate(name: str, n: int, seed: int = 0, image_size: int = DEFAULT_IMAGE_SIZE) -> list[Sample]:
    """n samples of a generated skill; the same (name, n, seed, image_size) gives the same samples.

    Each skill gets its own random stream (seeded by name and seed), so adding a skill or
    changing n for one skill never changes another skill's samples.
    """
    spec = get_skill(name)
    rng = random.Random(f"{name}:{seed}")
    out = []
    for i in range(n):
        s = spec.fn(rng, image_size)
        out.append(Sample(s.image, s.question, s.answer, s.answer_type, s.choices, name, f"{name}-{seed}-{i}", s.meta))
    return out


__all__ = ["Sample", "SkillSpec", "SKILLS", "skill", "get_skill", "generate", "target_skills", "heldout_skills"]
