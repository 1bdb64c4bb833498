"""Imports every generator module so that its skills register (see skills._load_generators)."""

from lmm_ray.skills import heldout, targets  # noqa: F401
