"""Lean trial checkpoints: only what the trial changed, never the frozen base.

A checkpoint folder holds `trainable.safetensors` (the tensors the recipe trains, under their
names in the recipe-applied model) and `state.json` (stage index, per-stage metric history,
the recipe and the model reference). The optimizer and scheduler are restarted at every stage,
as in the study, so at a stage boundary they carry no state worth saving; batches are drawn
from generators seeded by (seed, stage), so no RNG state is needed either (see optim.py).
`to_full_model` turns a checkpoint back into a complete `save_pretrained` folder.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

TENSORS = "trainable.safetensors"
STATE = "state.json"


def unwrap(model):
    return model.module if hasattr(model, "module") else model


def _sharded(params) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in params)


def trainable_state(model) -> dict[str, torch.Tensor]:
    params = [(n, p) for n, p in unwrap(model).named_parameters() if p.requires_grad]
    if _sharded(p for _, p in params):
        # Gathering is a collective: one rank alone would wait forever for the others.
        raise ValueError("the model is sharded (FSDP): call parallel.full_trainable_state(model) on every rank "
                         "and pass its result to checkpoint.save(..., tensors=...) on rank 0")
    return {n: p.detach().to("cpu").contiguous() for n, p in params}


def save(path: str | Path, model, state: dict, tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """Write a checkpoint folder. `tensors`: the trainable tensors when they were gathered already
    (a sharded model: `parallel.full_trainable_state`); by default they are read off `model`."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file(trainable_state(model) if tensors is None else tensors, str(path / TENSORS))
    (path / STATE).write_text(json.dumps(state, indent=1))
    return path


def load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    return load_file(str(Path(path) / TENSORS))


def load_state(path: str | Path) -> dict:
    return json.loads((Path(path) / STATE).read_text())


def restore(path: str | Path, model) -> dict:
    """Load the checkpoint's tensors into a recipe-applied model; returns the saved state.
    A sharded (FSDP) model takes its shards of them: then every rank must call this."""
    tensors = load_file(str(Path(path) / TENSORS))
    params = dict(unwrap(model).named_parameters())
    missing = [n for n in tensors if n not in params]
    if missing:
        raise ValueError(f"checkpoint {path} holds tensors the model does not have (recipe mismatch?): {missing[:3]}")
    trainable = {n for n, p in params.items() if p.requires_grad}
    if set(tensors) != trainable:
        raise ValueError(f"checkpoint {path} does not match the recipe's trainable set ({len(tensors)} vs {len(trainable)} tensors)")
    if _sharded(params[n] for n in trainable):
        from lmm_ray import parallel

        parallel.load_trainable_state(model, tensors)
        return load_state(path)
    with torch.no_grad():
        for n, t in tensors.items():
            params[n].copy_(t.to(params[n].device, params[n].dtype))
    return load_state(path)


def to_full_model(ckpt: str | Path, out_dir: str | Path, model_ref: str | None = None,
                  dtype: torch.dtype | None = None) -> Path:
    """Apply a checkpoint to its base model and save a full model folder (model, tokenizer, processor),
    with weights in `dtype` (default fp32)."""
    from lmm_ray import models, recipes

    state = load_state(ckpt)
    loaded = models.load_model(model_ref or state["model"], dtype=dtype)
    spec = recipes.RecipeSpec.from_dict(state["recipe_name"], state["recipe"])
    model, _ = recipes.apply(loaded.model, loaded.family, spec)
    restore(ckpt, model)
    return save_full_model(loaded, model, out_dir)


def save_full_model(loaded, model, out_dir: str | Path) -> Path:
    """Save a trained (recipe-applied) model as a plain `save_pretrained` folder with its tokenizer
    and processor: LoRA adapters folded into the base weights, every parameter trainable again."""
    if hasattr(model, "merge_and_unload"):  # peft
        model = model.merge_and_unload()
    model = unwrap(model)
    for p in model.parameters():
        p.requires_grad_(True)
    loaded.model = model
    loaded.save(out_dir)
    return Path(out_dir)
