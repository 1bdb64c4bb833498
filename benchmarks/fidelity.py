"""How well a finished sweep shows the study's three phenomena, with numbers.

    python benchmarks/fidelity.py runs/quickstart        # a sweep's storage folder

(a) Recovery: held-out accuracy partly comes back after a later, different stage. Per trial and
    stage s >= 2: mean held-out accuracy after s minus its minimum over stages 1..s-1 (pp; > 0 =
    recovery). Reported: the largest per trial, and how many trials recover at all.
(b) The counting bias tracks forgetting: Spearman's rho across finished trials between counting
    bias and held-out change (the study: more bias, more forgetting, so rho < 0); the same for KL.
(c) The recipe ordering at matched learning: each recipe's held-out change interpolated along its
    learning-rate curve (trials sorted by learning) at a learning value all compared recipes reach;
    the study: SA proj and MLP gate&up forget far less than the full LLM.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lmm_ray.results import load_results  # noqa: E402

COMPARED = ("sa_proj", "mlp_gate_up", "full", "llm")


def recovery(stages: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for tid, g in stages.groupby("trial_id"):
        h = g.sort_values("stage").set_index("stage")["heldout_mean"]
        best = max((h[s] - h.loc[1:s - 1].min() for s in h.index if s >= 2), default=float("nan"))
        rows.append({"trial_id": tid, "recovery_pp": best})
    return pd.DataFrame(rows)


def matched(res: pd.DataFrame) -> tuple[float | None, dict]:
    curves = {}
    for recipe, g in res.groupby("recipe"):
        g = g.sort_values("learning")
        if recipe in COMPARED and len(g) >= 1:
            curves[recipe] = (g["learning"].to_numpy(float), g["heldout_change"].to_numpy(float))
    if len(curves) < 2:
        return None, {}
    lo = max(c[0].min() for c in curves.values())
    hi = min(c[0].max() for c in curves.values())
    if lo > hi:  # no common learning value: compare at the closest
        return None, {r: (float(c[0][-1]), float(c[1][-1])) for r, c in curves.items()}
    at = (lo + hi) / 2
    return at, {r: float(np.interp(at, c[0], c[1])) for r, c in curves.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sweep_dir", help="a finished sweep's storage folder (holds results.csv and stages.csv)")
    a = ap.parse_args(argv)
    res, st = load_results(a.sweep_dir)
    res = res[res["status"] == "finished"]
    st = st[st["trial_id"].isin(res["trial_id"])]
    print(f"# {a.sweep_dir}: {len(res)} finished trials")

    rec = recovery(st).merge(res[["trial_id", "recipe", "lr"]], on="trial_id")
    n_rec = int((rec["recovery_pp"] > 0).sum())
    print(f"\n(a) recovery after a later stage: {n_rec} of {len(rec)} trials recover; "
          f"largest {rec['recovery_pp'].max():+.1f} pp, median {rec['recovery_pp'].median():+.1f} pp")
    for r in rec.sort_values("recovery_pp", ascending=False).itertuples():
        print(f"    {r.recipe:<12} lr {r.lr:.2e}  {r.recovery_pp:+6.1f} pp")

    if len(res) >= 3:
        rho_b = spearmanr(res["counting_bias"], res["heldout_change"]).statistic
        rho_k = spearmanr(res["kl_base"], res["heldout_change"]).statistic
        print(f"\n(b) Spearman rho across trials: counting bias vs held-out change {rho_b:+.2f}; "
              f"KL(base||tuned) vs held-out change {rho_k:+.2f}  (the study: negative)")
    else:
        print("\n(b) needs at least 3 finished trials")

    at, vals = matched(res)
    if at is None and not vals:
        print(f"\n(c) needs trials of at least two of {', '.join(COMPARED)}")
    elif at is None:
        print("\n(c) no learning value every compared recipe reaches; at each recipe's highest learning:")
        for r, (learn, hc) in vals.items():
            print(f"    {r:<12} learning {learn:+.1f}  held-out change {hc:+.1f}")
    else:
        print(f"\n(c) held-out change at matched learning {at:+.1f} pp (interpolated along each recipe's trials):")
        for r, hc in sorted(vals.items(), key=lambda kv: -kv[1]):
            print(f"    {r:<12} {hc:+.1f} pp")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
