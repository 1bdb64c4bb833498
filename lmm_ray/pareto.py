"""Pareto front of a sweep's results, its hypervolume, a pick, a report, plots, recipe export.

The objective vector is (learning up, held-out change up, counting bias down); all three are
changes from the base model. The hypervolume is measured against a reference point the user
chooses (the sweep file's `objective.reference_*`: the worst trial still acceptable, by default
no learning, -50 pp held-out change, +0.2 counting bias): a recipe only adds volume where it is
better than that point on every objective, so two sweeps of one space compare by their volumes.
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
    """Hypervolume of the front against `ref`: a sequence in objective order or a mapping
    {objective: value}; None is the base model itself, (0, 0, 0)."""
    f = front(results, objectives)
    if ref is None:
        ref = np.zeros(len(objectives))
    elif isinstance(ref, dict):
        ref = [float(ref[c]) for c, _ in objectives]
    return hypervolume(f[[c for c, _ in objectives]].to_numpy(dtype=float), ref, [s for _, s in objectives])


def format_reference(ref: dict) -> str:
    """`learning 0, held-out change -50, counting bias +0.2`: the reference point as a user reads it."""
    names = {"learning": "learning", "heldout_change": "held-out change", "counting_bias": "counting bias"}
    return ", ".join(f"{names.get(k, k)} {'+' if float(v) > 0 else ''}{float(v):g}" for k, v in ref.items())


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


def fmt_lr(x) -> str:
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


_fmt_lr = fmt_lr


def _num(spec: str, scale: float = 1.0):
    return lambda x: "-" if pd.isna(x) else format(float(x) * scale, spec)


def _id(x) -> str:
    return "-" if pd.isna(x) or x == "" else str(int(x)) if isinstance(x, (int, float, np.number)) else str(x)


# (column, header, formatter); columns missing from a table are left out of its report.
# `trial_id` is Tune's trial id: the MLflow run carries it as the tag lmm_ray.trial_id, and
# `optuna_trial` is the Optuna trial number ("Trial 6" in optuna-dashboard).
_REPORT = (
    ("trial_id", "trial", str),
    ("optuna_trial", "optuna", _id),
    ("recipe", "recipe", str),
    ("lr", "lr", fmt_lr),
    ("learning", "learning", _num("+.1f")),
    ("target_forgetting", "target forgetting", _num("+.1f")),
    ("heldout_change", "held-out change", _num("+.1f")),
    ("counting_bias", "counting bias", _num("+.3f")),
    ("objective", "objective", _num("+.1f")),
    ("trainable_share", "trainable %", _num(".3g", 100.0)),
)
_METRIC_COLUMNS = ("learning", "target_forgetting", "heldout_change", "counting_bias", "objective")


def _report(df: pd.DataFrame, front_ids, digits: int) -> pd.DataFrame:
    cols = [(c, h, _num(f"+.{digits}f") if c in _METRIC_COLUMNS and c != "counting_bias" else f)
            for c, h, f in _REPORT if c in df.columns]
    out = pd.DataFrame({h: df[c].map(f) for c, h, f in cols}, index=df.index)
    if "status" in df.columns and (df["status"] != "finished").any():
        out["status"] = df["status"].astype(str)
    if front_ids is not None:
        _require(df, ["trial_id"], "table to mark")
        on = set(map(str, front_ids))
        out.insert(0, "*", ["*" if str(t) in on else "" for t in df["trial_id"]])
    return out


def format_markdown(df: pd.DataFrame, front_ids=None) -> str:
    """The report as a markdown table (accuracies in pp to 2 decimals), e.g. for an MLflow description."""
    if df.empty:
        return "(no trials)"
    out = _report(df, front_ids, 2)
    if "*" in out:
        out["*"] = out["*"].map({"*": "✓"}).fillna("")
        out = out.rename(columns={"*": "Pareto"})
    lines = ["| " + " | ".join(out.columns) + " |", "|" + "---|" * len(out.columns)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in out.itertuples(index=False)]
    return "\n".join(lines)


def format_table(df: pd.DataFrame, front_ids=None) -> str:
    """Fixed-width report of trials (pp unless noted; counting bias is a probability change).

    With `front_ids` (trial ids), a leading `*` column marks the front members; a status column
    appears when some rows did not finish, so a good-looking row without `*` explains itself.
    """
    if df.empty:
        return "(no trials)"
    out = _report(df, front_ids, 1)
    for col in ("trial", "recipe"):  # names read better left-aligned; to_string right-aligns equal widths
        if col in out:
            width = max(out[col].str.len().max(), len(col))
            out[col] = out[col].str.ljust(width)
            out = out.rename(columns={col: col.ljust(width)})
    return out.to_string(index=False)


# --- plots ---------------------------------------------------------------------------------------


def _figure(width: float = 7.0, height: float = 5.0):
    # A bare Figure renders with Agg without touching pyplot's global backend or state, so
    # plotting is safe from any thread or process; matplotlib loads only when plotting.
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=110, layout="constrained")


def recipe_colours(recipes) -> dict[str, str]:
    """One colour per recipe, the same in every figure of a sweep: recipes in sorted order take
    tab10's colours (tab20's beyond ten)."""
    names = sorted({str(r) for r in recipes})
    if len(names) <= 10:
        palette = [f"C{i}" for i in range(10)]
    else:
        from matplotlib import colormaps

        palette = [colormaps["tab20"](i) for i in range(20)]
    return {r: palette[i % len(palette)] for i, r in enumerate(names)}


def _bias_size(bias: np.ndarray, top: float) -> np.ndarray:
    # more bias = bigger marker; clipped at 0 because a drop in bias is not worth drawing large
    return 25 + 275 * (np.clip(bias, 0, None) / top if top > 0 else np.zeros_like(bias))


def plot_tradeoff(results: pd.DataFrame, path, objectives=OBJECTIVES, colours: dict | None = None) -> Path:
    """Learning vs held-out change of every trial: colour = recipe, label = learning rate,
    marker size = counting bias (with a key), the Pareto front circled and joined."""
    _require(results, ["recipe", "status", "learning", "heldout_change", "counting_bias"], "results table")
    fig = _figure(8.0, 5.5)
    ax = fig.add_subplot()
    ax.axhline(0, color="0.8", lw=0.8, ls="--", zorder=0)
    ax.axvline(0, color="0.8", lw=0.8, ls="--", zorder=0)
    shown = results.dropna(subset=["learning", "heldout_change"])
    bias = shown["counting_bias"].fillna(0).to_numpy(dtype=float)
    top = float(np.clip(bias, 0, None).max()) if len(bias) else 0.0
    shown = shown.assign(_size=_bias_size(bias, top))
    done = shown["status"] == "finished"
    colours = colours or recipe_colours(results["recipe"].astype(str))
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
    if "lr" in shown:
        for r in shown.itertuples():
            ax.annotate(fmt_lr(r.lr), (r.learning, r.heldout_change), xytext=(5, 4), textcoords="offset points",
                        fontsize="x-small", color="0.3")
    f = front(results, objectives).dropna(subset=["learning", "heldout_change"])
    if len(f):
        f = f.sort_values("learning")
        # "pre": drop at each point then run right, the edge of the 2-D region the front dominates
        ax.step(f["learning"], f["heldout_change"], where="pre", color="k", lw=1, alpha=0.6)
        ax.scatter(f["learning"], f["heldout_change"], s=shown.loc[f.index, "_size"] + 40,
                   facecolors="none", edgecolors="k", linewidths=1.4, label="Pareto front")
    ax.set_xlabel("learning (pp, target accuracy gain vs base)")
    ax.set_ylabel("held-out change (pp vs base; < 0 = forgetting)")
    ax.set_title(f"All {len(shown)} trials: learning vs held-out change\n"
                 "colour = recipe, label = learning rate, size = counting bias", fontsize="medium")
    legend = fig.legend(*ax.get_legend_handles_labels(), fontsize="small", loc="outside right upper", title="recipe")
    for handle in legend.legend_handles:  # legend markers show colour and style, not bias
        handle.set_sizes([40])
    # the size key: what a small, middle and large marker mean
    keys = sorted({round(v, 3) for v in (0.0, top / 2, top)}) if top > 0 else [0.0]
    handles = [ax.scatter([], [], s=float(_bias_size(np.array([k]), top)[0]), color="0.6") for k in keys]
    fig.legend(handles, [f"{k:+.3g}" for k in keys], fontsize="small", loc="outside right lower",
               title="counting bias", labelspacing=1.3, borderpad=0.8)
    fig.savefig(path)
    return Path(path)


def plot_stages(stages: pd.DataFrame, trial_ids, labels, path, colours=None, title: str | None = None) -> Path:
    """Mean held-out accuracy after each stage, one line per trial (the study's Figure 1, right).

    `labels` (one per trial, e.g. "sa_proj lr=1e-4") may be None to label lines by trial id;
    `colours` (one per trial, e.g. from recipe_colours) None for matplotlib's cycle; `title`
    says which trials these are (default: "Held-out accuracy across sequential tuning").
    """
    _require(stages, ["trial_id", "stage", "skill", "heldout_mean"], "stage table")
    trial_ids = list(trial_ids)
    labels = [str(t) for t in trial_ids] if labels is None else list(labels)
    if len(labels) != len(trial_ids):
        raise ValueError(f"{len(labels)} labels for {len(trial_ids)} trials")
    colours = [None] * len(trial_ids) if colours is None else list(colours)
    ids = stages["trial_id"].astype(str)
    missing = [t for t in trial_ids if str(t) not in set(ids)]
    if missing:
        raise ValueError(f"trial(s) {missing} not in the stage table")
    fig = _figure()
    ax = fig.add_subplot()
    styles = ("-", "--", ":", "-.")
    seen: dict = {}
    for tid, label, colour in zip(trial_ids, labels, colours):
        rows = stages[ids == str(tid)].sort_values("stage")
        n = seen[colour] = seen.get(colour, -1) + 1  # same recipe twice: same colour, another line style
        ax.plot(rows["stage"], rows["heldout_mean"], marker="o", label=label, color=colour, ls=styles[n % len(styles)])
    # trials share the stage sequence; one stopped early just has a shorter line
    picked = stages[ids.isin([str(t) for t in trial_ids])]
    names = {}
    for stage, skills in picked.groupby("stage")["skill"]:
        uniq = sorted({str(s) for s in skills.fillna("") if str(s)})
        names[int(stage)] = "base" if int(stage) == 0 else "/".join(uniq) or str(stage)
    ax.set_xticks(list(names), list(names.values()), rotation=20)
    ax.set_xlabel("after stage (skill trained)")
    ax.set_ylabel("mean held-out accuracy (%)")
    ax.set_title(title or "Held-out accuracy across sequential tuning", fontsize="medium")
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
    metrics = [f"{c}={float(row[c]):+.4g}" for c in _METRIC_COLUMNS if c in row and not pd.isna(row[c])]
    if "trainable_share" in row and not pd.isna(row["trainable_share"]):
        metrics.append(f"trainable={100 * float(row['trainable_share']):.3g}%")
    if metrics:
        header.append("# " + ", ".join(metrics))
    header.append("# plain values are fixed; use this file as (or merge it into) a search space")
    body = yaml.safe_dump(recipe, sort_keys=False, default_flow_style=False)  # floats dump as repr
    Path(path).write_text("\n".join(header) + "\n" + body)
    return recipe
