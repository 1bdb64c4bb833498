"""One trial, fully described: what a Ray Train worker needs to fine-tune and evaluate.

    spec = trial_spec(cfg, sampled, trial_id)  # a SweepConfig + one point Optuna sampled
    spec.recipe.lwf, spec.train.batch_size      # typed all the way to the worker
    TrialSpec.from_dict(spec.to_dict()) == spec # the only place it becomes a dict: the Ray boundary

The sampled point (recipe name, lr, layers, LoRA rank, ...) is turned into the concrete
`RecipeSpec` and `TrainConfig` here, once, by space.trial_recipe / space.trial_train; the worker
never re-reads the sweep file or re-merges defaults.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from lmm_ray.config import HeldoutConfig, StageConfig, SweepConfig
from lmm_ray.schema import DataConfig, EvalConfig, TrainConfig
from lmm_ray.space import trial_recipe, trial_train

PREDICTIONS = "predictions"  # the sweep folder's subfolder of per-trial prediction files

if TYPE_CHECKING:  # lmm_ray.recipes imports transformers; the driver's config path stays light
    from lmm_ray.recipes import RecipeSpec


@dataclass(frozen=True)
class TrialSpec:
    model: str
    recipe: RecipeSpec  # the concrete recipe, searched options applied
    lr: float
    stages: tuple[StageConfig, ...]
    heldout: tuple[HeldoutConfig, ...]
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    data: DataConfig = DataConfig()
    lam: float = 1.0  # objective weights (objective.py)
    mu: float = 100.0
    trial_id: str = "local"
    strategy: str = "ddp"  # ddp | fsdp with more than one worker (resolved: never "auto" here)
    predictions_dir: str | None = None  # <sweep>/predictions/<trial id>: a JSONL per stage and skill

    @property
    def recipe_name(self) -> str:
        return self.recipe.name

    @property
    def targets(self) -> list[str]:
        return [s.name for s in self.stages]

    def stage_steps(self, s: int, pool_size: int) -> int:
        """Optimizer steps of stage s (0-based): given, or `epochs` passes over a pool of `pool_size`."""
        st = self.stages[s]
        if st.steps is not None:
            return int(st.steps)
        return max(1, math.ceil(float(st.epochs) * pool_size / self.train.batch_size))

    def to_dict(self) -> dict:
        """Plain data for Ray (train_loop_config) and for checkpoints."""
        return {"model": self.model, "recipe_name": self.recipe.name, "recipe": self.recipe.to_dict(), "lr": self.lr,
                "stages": [asdict(s) for s in self.stages], "heldout": [asdict(h) for h in self.heldout],
                "train": asdict(self.train), "eval": asdict(self.eval), "data": asdict(self.data), "lam": self.lam,
                "mu": self.mu, "trial_id": self.trial_id, "strategy": self.strategy, "predictions_dir": self.predictions_dir}

    @classmethod
    def from_dict(cls, d: dict) -> "TrialSpec":
        from lmm_ray.recipes import RecipeSpec

        return cls(model=d["model"], recipe=RecipeSpec.from_dict(d["recipe_name"], d["recipe"]), lr=float(d["lr"]),
                   stages=tuple(StageConfig(**s) for s in d["stages"]),
                   heldout=tuple(HeldoutConfig(**h) for h in d["heldout"]),
                   train=TrainConfig(**d["train"]), eval=EvalConfig(**d["eval"]), data=DataConfig(**d.get("data", {})),
                   lam=d["lam"], mu=d["mu"], trial_id=d["trial_id"], strategy=d.get("strategy", "ddp"),
                   predictions_dir=d.get("predictions_dir"))


def trial_spec(cfg: SweepConfig, sampled: dict, trial_id: str = "local") -> TrialSpec:
    """The trial a sampled configuration of `cfg`'s search space means."""
    return TrialSpec(
        model=cfg.model,
        recipe=trial_recipe(cfg.search_space, sampled),
        lr=float(sampled["lr"]),
        stages=cfg.stages,
        heldout=cfg.heldout,
        train=trial_train(cfg.train, sampled),
        eval=cfg.eval,
        data=cfg.data,
        lam=cfg.objective.lam,
        mu=cfg.objective.mu,
        trial_id=trial_id,
        strategy=resolved_strategy(cfg, trial_recipe(cfg.search_space, sampled).name),
        predictions_dir=f"{cfg.sweep_dir.rstrip('/')}/{PREDICTIONS}/{trial_id}",
    )


def resolved_strategy(cfg: SweepConfig, recipe: str) -> str:
    """ddp or fsdp: `auto` takes DDP when the recipe fits one GPU's memory budget replicated, else FSDP
    (memory.estimate on the model's configuration; CPU trials and one-worker trials take DDP)."""
    r = cfg.resources
    if r.strategy != "auto":
        return r.strategy
    if r.num_workers <= 1 or not r.gpus_per_worker:
        return "ddp"
    from lmm_ray import memory

    return memory.pick_strategy(cfg, recipe)
