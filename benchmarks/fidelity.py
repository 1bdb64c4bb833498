"""How well a finished sweep shows the study's three phenomena, with numbers.

    python benchmarks/fidelity.py runs/quickstart        # a sweep's storage folder

(a) Recovery: held-out accuracy partly comes back after a later, different stage. Per trial and
    stage s >= 2: mean held-out accuracy after s minus its minimum over stages 1..s-1 (pp; > 0 =
    recovery). Reported: the largest per trial, and how many trials recover at all.
(b) The counting bias tracks forgetting: Spearman's rho across finished trials between counting
    bias and held-out change (the study: more bias, more forgetting, so rho < 0); the same for KL.
(c) The recipe ordering at matched learning, pair by pair: SA proj vs the whole LLM, MLP gate&up
    vs the whole LLM (`llm`, and `full` = LLM + vision + projector, whichever the sweep has), and
    SA proj vs gate&up. Each recipe's held-out change is interpolated along its learning-rate
    curve (its trials sorted by learning) at the middle of the learning range both recipes of the
    pair reach. The study (+learning / held-out change): SA proj +24.9 / -0.6, gate&up +30.5 / -2.1,
    whole LLM +31.8 / -23.3, i.e. each of the first two forgets less than the whole LLM, and SA proj
    slightly less than gate&up.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lmm_ray.errors import UserError  # noqa: E402
from lmm_ray.results import load_results  # noqa: E402

# (recipe, recipe it should forget less than in the study)
PAIRS = (("sa_proj", "llm"), ("mlp_gate_up", "llm"), ("sa_proj", "full"), ("mlp_gate_up", "full"),
         ("sa_proj", "mlp_gate_up"))


def recovery(stages: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for tid, g in stages.groupby("trial_id"):
        h = g.sort_values("stage").set_index("stage")["heldout_mean"]
        best = max((h[s] - h.loc[1:s - 1].min() for s in h.index if s >= 2), default=float("nan"))
        rows.append({"trial_id": tid, "recovery_pp": best})
    return pd.DataFrame(rows, columns=["trial_id", "recovery_pp"])


def curves(res: pd.DataFrame) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """recipe -> (learning, held-out change) of its trials, sorted by learning."""
    out = {}
    for recipe, g in res.groupby("recipe"):
        g = g.sort_values("learning")
        out[recipe] = (g["learning"].to_numpy(float), g["heldout_change"].to_numpy(float))
    return out


def matched(res: pd.DataFrame) -> list[dict]:
    """One row per pair of PAIRS the sweep has: at the middle of the learning range both reach,
    each one's interpolated held-out change and whether the first forgets less (as in the study);
    `at` None when their learning ranges do not overlap (then each one's range is given)."""
    c, rows = curves(res), []
    for a, b in PAIRS:
        if a not in c or b not in c:
            continue
        lo, hi = max(c[a][0].min(), c[b][0].min()), min(c[a][0].max(), c[b][0].max())
        row = {"recipe": a, "versus": b, "range": {r: (float(c[r][0].min()), float(c[r][0].max())) for r in (a, b)}}
        if lo > hi:
            rows.append({**row, "at": None})
            continue
        at = (lo + hi) / 2
        ha, hb = (float(np.interp(at, *c[r])) for r in (a, b))
        rows.append({**row, "at": at, "heldout": ha, "versus_heldout": hb, "as_study": ha > hb})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sweep_dir", help="a finished sweep's storage folder (holds results.csv and stages.csv)")
    a = ap.parse_args(argv)
    try:
        res, st = load_results(a.sweep_dir)
    except UserError as e:  # a wrong folder is the user's to fix: say so, no traceback
        print(f"fidelity.py: error: {e}", file=sys.stderr)
        return 2
    res = res[res["status"] == "finished"]
    st = st[st["trial_id"].isin(res["trial_id"])]
    print(f"# {a.sweep_dir}: {len(res)} finished trials")
    if res.empty:
        print("fidelity.py: error: no finished trial to measure yet (results.csv lists only failed or "
              "stopped ones); run it again when the sweep has finished trials", file=sys.stderr)
        return 2

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

    rows = matched(res)
    if not rows:
        print("\n(c) needs trials of SA proj or MLP gate&up and of the whole LLM (llm or full)")
    else:
        print("\n(c) held-out change at matched learning, pair by pair (interpolated along each recipe's trials):")
        for r in rows:
            if r["at"] is None:
                ranges = "; ".join(f"{k} {lo:+.1f}..{hi:+.1f}" for k, (lo, hi) in r["range"].items())
                print(f"    {r['recipe']:<12} vs {r['versus']:<12} no common learning value (learning {ranges})")
            else:
                verdict = "as in the study" if r["as_study"] else "NOT as in the study"
                print(f"    {r['recipe']:<12} vs {r['versus']:<12} at learning {r['at']:+5.1f}: "
                      f"{r['heldout']:+6.1f} vs {r['versus_heldout']:+6.1f} pp  ({verdict})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
