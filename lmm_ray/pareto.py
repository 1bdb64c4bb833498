"""Pareto front of a sweep's results, its hypervolume, a pick, a report, plots, recipe export.

The objective vector is (learning up, held-out change up, counting bias down); all three are
changes from the base model, so the base is the reference point (0, 0, 0): a recipe only adds
hypervolume where it beats the untouched model on every objective.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import yaml

from lmm_ray.objective import VECTOR as OBJECTIVES  # (learning up, held-out change up, counting bias down)
PICKS = ("knee", "max-learning", "min-forgetting")
SENSES = ("max", "min")


# --- front and hypervolume on plain arrays ---------------------------------------------------


def _oriented(points, senses: Sequence[str]) -> np.ndarray:
    """Flip "min" columns so that larger is better everywhere; dominance is then one comparison."""
    pts = np.asarray(points, dtype=float)
    if pts.ndim != 2:
        raise ValueError(f"points must be a 2-D array (n points x d objectives), got shape {pts.shape}")
    if len(senses) != pts.shape[1]:
        raise ValueError(f"{len(senses)} senses for {pts.shape[1]} objectives")
    bad = [s for s in senses if s not in SENSES]
    if bad:
        raise ValueError(f"unknown sense(s) {bad}; valid: {', '.join(SENSES)}")
    return pts * np.array([1.0 if s == "max" else -1.0 for s in senses])


def pareto_mask(points, senses: Sequence[str]) -> np.ndarray:
    """Boolean mask of the non-dominated rows.

    a dominates b when a is at least as good in every objective and better in one, so exact
    duplicates never dominate each other: every copy of a front point is on the front. Rows with
    a NaN are never on the front and, being incomparable, dominate nothing.
    """
    pts = _oriented(points, senses)
    valid = ~np.isnan(pts).any(axis=1)
    mask = valid.copy()
    others = pts[valid]
    # O(n^2 d), vectorised per row: sweeps have tens to hundreds of trials.
    for i in np.flatnonzero(valid):
        p = pts[i]
        mask[i] = not np.any(np.all(others >= p, axis=1) & np.any(others > p, axis=1))
    return mask


def hypervolume(points, ref, senses: Sequence[str]) -> float:
    """Volume dominated by `points` and bounded by `ref` (exact, any dimension).

    Only points strictly better than `ref` in every objective count: a point that ties or loses
    to the reference on one axis encloses no volume with it.
    """
    pts = _oriented(points, senses)
    r = _oriented(np.asarray(ref, dtype=float).reshape(1, -1), senses)[0]
    if np.isnan(r).any():
        raise ValueError(f"reference point has a NaN: {ref}")
    pts = pts[~np.isnan(pts).any(axis=1)]
    pts = pts[np.all(pts > r, axis=1)]
    return float(_hv_max(pts, r))


def _hv_max(pts: np.ndarray, ref: np.ndarray) -> float:
    """Slicing (HSO): cut along the last axis at each distinct value, recurse on the slabs.

    Exponential in d in the worst case, but exact and tiny for tens of points in 3-D.
    """
    if len(pts) == 0:
        return 0.0
    if pts.shape[1] == 1:
        return float(pts[:, 0].max() - ref[0])
    pts = np.unique(pts[pareto_mask(pts, ["max"] * pts.shape[1])], axis=0)  # fewer points per slab
    levels = np.unique(pts[:, -1])[::-1]  # descending
    bottoms = np.append(levels[1:], ref[-1])
    return sum(
        (top - bottom) * _hv_max(pts[pts[:, -1] >= top, :-1], ref[:-1])
        for top, bottom in zip(levels, bottoms)
    )


# --- results tables ----------------------------------------------------------------------------


def _require(df: pd.DataFrame, columns, what: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise KeyError(f"{what} lacks column(s) {missing}; it has {list(df.columns)}")


def front(results: pd.DataFrame, objectives=OBJECTIVES) -> pd.DataFrame:
    """Pareto-optimal finished trials, best first objective first (learning descending).

    Stopped trials carry metrics from an unfinished stage sequence (an early stage can look
    great before later stages erase it), and failed ones carry none that can be trusted, so only
    `status == "finished"` rows compete. The original index is kept.
    """
    cols = [c for c, _ in objectives]
    senses = [s for _, s in objectives]
    _require(results, ["status", *cols], "results table")
    done = results[results["status"] == "finished"]
    on = done[pareto_mask(done[cols].to_numpy(dtype=float), senses)]
    # sort on every objective so ties on learning come out in a deterministic, useful order
    return on.sort_values(cols, ascending=[s == "min" for s in senses], kind="stable")


def front_hypervolume(results: pd.DataFrame, objectives=OBJECTIVES, ref=None) -> float:
    """Hypervolume of the front against the base model, (0, 0, 0) unless `ref` says otherwise."""
    f = front(results, objectives)
    ref = np.zeros(len(objectives)) if ref is None else ref
    return hypervolume(f[[c for c, _ in objectives]].to_numpy(dtype=float), ref, [s for _, s in objectives])


def pick(results: pd.DataFrame, how: str = "knee", objectives=OBJECTIVES) -> pd.Series:
    """One trial (a row of `results`) from the front.

    - "knee": each objective is min-max normalised over the front so that 1 is the best value
      any front member reaches and 0 the worst (an objective on which all members tie counts as
      1 for all). The ideal point is all ones; the knee is the member at the smallest Euclidean
      distance from it, i.e. the most balanced compromise. Ties go to the higher learning.
    - "max-learning": highest learning; ties broken by held-out change.
    - "min-forgetting": highest held-out change; ties broken by learning.
    """
    if how not in PICKS:
        raise ValueError(f"unknown pick {how!r}; valid choices: {', '.join(PICKS)}")
    f = front(results, objectives)
    if f.empty:
        counts = results["status"].value_counts().to_dict() if "status" in results else {}
        raise ValueError(
            "no finished trial with all objectives "
            f"({', '.join(c for c, _ in objectives)}) to pick from; trial statuses: {counts or 'none'}"
        )
    if how == "max-learning":
        return f.sort_values(["learning", "heldout_change"], ascending=False, kind="stable").iloc[0]
    if how == "min-forgetting":
        return f.sort_values(["heldout_change", "learning"], ascending=False, kind="stable").iloc[0]
    pts = _oriented(f[[c for c, _ in objectives]].to_numpy(dtype=float), [s for _, s in objectives])
    lo, hi = pts.min(axis=0), pts.max(axis=0)
    span = np.where(hi > lo, hi - lo, 1.0)
    norm = np.where(hi > lo, (pts - lo) / span, 1.0)
    return f.iloc[int(np.argmin(np.linalg.norm(1.0 - norm, axis=1)))]  # front is learning-sorted


# --- report --------------------------------------------------------------------------------------


def _fmt_lr(x) -> str:
    """1e-4 style: short mantissa, unpadded exponent, as people write learning rates."""
    if pd.isna(x):
        return "-"
    if x == 0:
        return "0"
    e = math.floor(math.log10(abs(x)))
    m = float(f"{x / 10**e:.3g}")
    if abs(m) >= 10:  # 9.9996e-5 rounds up to the next decade
        m, e = m / 10, e + 1
    return f"{m:g}e{e}"


def _num(spec: str, scale: float = 1.0):
    return lambda x: "-" if pd.isna(x) else format(float(x) * scale, spec)


# (column, header, formatter); columns missing from a table are left out of its report
_REPORT = (
    ("recipe", "recipe", str),
    ("lr", "lr", _fmt_lr),
    ("learning", "learning", _num("+.1f")),
    ("target_forgetting", "target forgetting", _num("+.1f")),
    ("heldout_change", "held-out change", _num("+.1f")),
    ("counting_bias", "counting bias", _num("+.3f")),
    ("objective", "objective", _num("+.1f")),
    ("trainable_share", "trainable %", _num(".3g", 100.0)),
)


def format_table(df: pd.DataFrame, front_ids=None) -> str:
    """Fixed-width report of trials (pp unless noted; counting bias is a probability change).

    With `front_ids` (trial ids), a leading `*` column marks the front members; a status column
    appears when some rows did not finish, so a good-looking row without `*` explains itself.
    """
    if df.empty:
        return "(no trials)"
    cols = [(c, h, f) for c, h, f in _REPORT if c in df.columns]
    out = pd.DataFrame({h: df[c].map(f) for c, h, f in cols}, index=df.index)
    if "recipe" in out:  # names read better left-aligned; to_string right-aligns equal widths
        width = max(out["recipe"].str.len().max(), len("recipe"))
        out["recipe"] = out["recipe"].str.ljust(width)
        out = out.rename(columns={"recipe": "recipe".ljust(width)})
    if "status" in df.columns and (df["status"] != "finished").any():
        out["status"] = df["status"].astype(str)
    if front_ids is not None:
        _require(df, ["trial_id"], "table to mark")
        on = set(map(str, front_ids))
        out.insert(0, "*", ["*" if str(t) in on else "" for t in df["trial_id"]])
    return out.to_string(index=False)


# --- plots ---------------------------------------------------------------------------------------


def _figure(width: float = 7.0, height: float = 5.0):
    # A bare Figure renders with Agg without touching pyplot's global backend or state, so
    # plotting is safe from any thread or process; matplotlib loads only when plotting.
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=110, layout="constrained")


def plot_tradeoff(results: pd.DataFrame, path, objectives=OBJECTIVES) -> Path:
    """Learning vs held-out change per trial, sized by counting bias, with the front marked."""
    _require(results, ["recipe", "status", "learning", "heldout_change", "counting_bias"], "results table")
    fig = _figure()
    ax = fig.add_subplot()
    ax.axhline(0, color="0.8", lw=0.8, ls="--", zorder=0)
    ax.axvline(0, color="0.8", lw=0.8, ls="--", zorder=0)
    shown = results.dropna(subset=["learning", "heldout_change"])
    bias = shown["counting_bias"].fillna(0).clip(lower=0).to_numpy(dtype=float)
    # more bias = bigger marker; clipped at 0 because a drop in bias is not worth drawing large
    sizes = 25 + 275 * (bias / bias.max() if len(bias) and bias.max() > 0 else bias)
    shown = shown.assign(_size=sizes)
    done = shown["status"] == "finished"
    colours = {r: f"C{i % 10}" for i, r in enumerate(sorted(shown["recipe"].astype(str).unique()))}
    for recipe, colour in colours.items():
        rows = shown[done & (shown["recipe"].astype(str) == recipe)]
        if rows.empty:  # only stopped/failed trials: they are drawn grey below
            continue
        ax.scatter(rows["learning"], rows["heldout_change"], s=rows["_size"], color=colour,
                   alpha=0.75, label=recipe)
    partial = shown[~done]
    if len(partial):
        ax.scatter(partial["learning"], partial["heldout_change"], s=partial["_size"],
                   facecolors="none", edgecolors="0.55", label="stopped / failed")
    f = front(results, objectives).dropna(subset=["learning", "heldout_change"])
    if len(f):
        f = f.sort_values("learning")
        # "pre": drop at each point then run right, the edge of the 2-D region the front dominates
        ax.step(f["learning"], f["heldout_change"], where="pre", color="k", lw=1, alpha=0.6)
        ax.scatter(f["learning"], f["heldout_change"], s=shown.loc[f.index, "_size"] + 40,
                   facecolors="none", edgecolors="k", linewidths=1.4, label="Pareto front")
    ax.set_xlabel("learning (pp, target accuracy gain vs base)")
    ax.set_ylabel("held-out change (pp vs base; < 0 = forgetting)")
    ax.set_title("Recipes: learning vs held-out change (marker size = counting bias)")
    legend = ax.legend(fontsize="small", loc="best")
    for handle in legend.legend_handles:  # legend markers show colour and style, not bias
        handle.set_sizes([40])
    fig.savefig(path)
    return Path(path)


def plot_stages(stages: pd.DataFrame, trial_ids, labels, path) -> Path:
    """Mean held-out accuracy after each stage, one line per trial (the study's Figure 1, right).

    `labels` (one per trial, e.g. "sa_proj lr=1e-4") may be None to label lines by trial id.
    """
    _require(stages, ["trial_id", "stage", "skill", "heldout_mean"], "stage table")
    trial_ids = list(trial_ids)
    labels = [str(t) for t in trial_ids] if labels is None else list(labels)
    if len(labels) != len(trial_ids):
        raise ValueError(f"{len(labels)} labels for {len(trial_ids)} trials")
    ids = stages["trial_id"].astype(str)
    missing = [t for t in trial_ids if str(t) not in set(ids)]
    if missing:
        raise ValueError(f"trial(s) {missing} not in the stage table")
    fig = _figure()
    ax = fig.add_subplot()
    for tid, label in zip(trial_ids, labels):
        rows = stages[ids == str(tid)].sort_values("stage")
        ax.plot(rows["stage"], rows["heldout_mean"], marker="o", label=label)
    # trials share the stage sequence; one stopped early just has a shorter line
    picked = stages[ids.isin([str(t) for t in trial_ids])]
    names = {}
    for stage, skills in picked.groupby("stage")["skill"]:
        uniq = sorted({str(s) for s in skills.fillna("") if str(s)})
        names[int(stage)] = "base" if int(stage) == 0 else "/".join(uniq) or str(stage)
    ax.set_xticks(list(names), list(names.values()), rotation=20)
    ax.set_xlabel("after stage (skill trained)")
    ax.set_ylabel("mean held-out accuracy (%)")
    ax.set_title("Held-out accuracy across sequential tuning")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.savefig(path)
    return Path(path)


# --- export and load -----------------------------------------------------------------------------


def _plain(v):
    return v.item() if isinstance(v, np.generic) else v


def export_recipe(row, path, sweep: str | None = None, how: str | None = None) -> dict:
    """Write a trial's searched values as a search-space YAML of fixed values; return the dict.

    Only searchable keys go in the mapping (plain scalars mean "fixed" in a search space), so the
    file drops into a sweep unchanged; provenance lives in comments. Params that are NaN for this
    trial (conditional ones its recipe did not use) are left out rather than fixed to NaN.
    """
    row = pd.Series(row)
    recipe = {"recipe": str(row["recipe"]), "lr": float(row["lr"])}
    for key, value in row.items():
        if str(key).startswith("param/") and not pd.isna(value):
            recipe[str(key)[len("param/"):]] = _plain(value)
    header = [f"# lmm_ray recipe exported from sweep {sweep or '?'}, trial {row.get('trial_id', '?')}"
              + (f" (pick: {how})" if how else "")]
    metrics = [f"{c}={float(row[c]):+.4g}" for c, *_ in _REPORT[2:-1] if c in row and not pd.isna(row[c])]
    if "trainable_share" in row and not pd.isna(row["trainable_share"]):
        metrics.append(f"trainable={100 * float(row['trainable_share']):.3g}%")
    if metrics:
        header.append("# " + ", ".join(metrics))
    header.append("# plain values are fixed; use this file as (or merge it into) a search space")
    body = yaml.safe_dump(recipe, sort_keys=False, default_flow_style=False)  # floats dump as repr
    Path(path).write_text("\n".join(header) + "\n" + body)
    return recipe
