"""Per-stage metrics -> learning, forgetting, counting bias, and the objective (docs/architecture.md, "Metrics").

`history[s]` is the flat metrics dict after stage s (stage 0 = the base model): it holds
`target/<skill>/acc`, `heldout/mean_acc` and `probe/number_mass` (accuracies in percentage
points, the number mass a probability). `stage_skills[s - 1]` is the skill trained at stage s.
All aggregates use the stages completed so far, so they can be reported after every stage.
"""

from __future__ import annotations

from statistics import mean
from typing import Sequence

# The names every module uses for the trial-level numbers.
AGGREGATES = (
    "learning",
    "target_forgetting",
    "heldout_change",
    "heldout_change_final",
    "heldout_change_worst",
    "counting_bias",
    "counting_bias_final",
    "caption_counting_bias",
    "kl_base",
    "objective",
)
# The objective vector for multi-objective search and the Pareto front.
VECTOR = (("learning", "max"), ("heldout_change", "max"), ("counting_bias", "min"))


def aggregate(history: Sequence[dict], stage_skills: Sequence[str], lam: float = 1.0, mu: float = 100.0) -> dict[str, float]:
    S = len(history) - 1
    if S < 1:
        raise ValueError("aggregate needs the base (stage 0) and at least one trained stage")
    base = history[0]

    def acc(s: int, skill: str) -> float:
        return history[s][f"target/{skill}/acc"]

    learning = mean(acc(s, stage_skills[s - 1]) - acc(0, stage_skills[s - 1]) for s in range(1, S + 1))
    # Retention of each earlier stage's skill at the last stage (negative = forgotten). With one
    # stage there is nothing to forget yet: 0.
    forgetting = mean(acc(S, stage_skills[s - 1]) - acc(s, stage_skills[s - 1]) for s in range(1, S)) if S > 1 else 0.0
    heldout = [history[s]["heldout/mean_acc"] - base["heldout/mean_acc"] for s in range(1, S + 1)]
    # The bias is averaged over stages like the held-out change, so a stage that pushes the output
    # toward numbers counts even when a later stage pulls it back (the study's "recovery").
    bias = [history[s]["probe/number_mass"] - base["probe/number_mass"] for s in range(1, S + 1)]
    out = {
        "learning": learning,
        "target_forgetting": forgetting,
        "heldout_change": mean(heldout),
        "heldout_change_final": heldout[-1],
        "heldout_change_worst": min(heldout),
        "counting_bias": mean(bias),
        "counting_bias_final": bias[-1],
        # The study's form of the probe: number mass over the generated steps of caption prompts
        # (evaluate.caption_probe), its change from the base averaged over stages like the bias.
        "caption_counting_bias": mean(history[s]["probe/caption_number_mass"] - base["probe/caption_number_mass"]
                                      for s in range(1, S + 1)) if "probe/caption_number_mass" in base else float("nan"),
        "kl_base": history[S].get("probe/kl_base", float("nan")),
    }
    out["objective"] = scalar_objective(out, lam, mu)
    return out


def scalar_objective(m: dict, lam: float, mu: float) -> float:
    """learning + lambda * min(0, held-out change) - mu * counting bias (maximised)."""
    return m["learning"] + lam * min(0.0, m["heldout_change"]) - mu * m["counting_bias"]
