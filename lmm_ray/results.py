"""A sweep's results: one row per trial (one schema, wherever the row comes from), the sweep's
folder, loading, and the summary printed at the end of a sweep.

A row is built by `result_row` from a trial's sampled config and its last reported metrics;
`collect` does it for Tune's results, tracking.results_from_mlflow for MLflow runs (when a killed
driver left no results.csv), and `load_results` reads back what `write_tables` wrote. The Pareto
front and picks are pareto.py's; the objective vector is objective.VECTOR.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

import pandas as pd

from lmm_ray import objective, pareto
from lmm_ray.errors import ResultsNotFound
from lmm_ray.schema import is_uri

# Constant per trial (set by the recipe on the model), reported with every stage.
SIZE_COLUMNS = ("trainable", "total_params", "trainable_share")
RESULTS_FILE, STAGES_FILE, PARETO_FILE = "results.csv", "stages.csv", "pareto.csv"


def trial_status(last: dict, stages_total: int) -> tuple[str, str]:
    """(status, reason) of a trial from its last reported result."""
    if last.get("failed"):
        return "failed", failure_reason(str(last.get("failure_reason", "")))
    if int(last.get("stage", 0)) < stages_total:
        return "stopped", "stopped early by the scheduler"
    return "finished", ""


ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")
# Lines of a traceback or of Ray's wrappers around the real error: never the reason.
_NOISE = re.compile(r"^(Traceback \(most recent call last\)|File \"|During handling|The above exception|\^+$|~+$|"
                    r"ray::|\[Rank [\d,]+ Error Snippet\]|Training failed due to|\.\.\.)")


def failure_reason(error, limit: int = 300) -> str:
    """The one line that says why a trial failed, for the console table, results.csv and MLflow.

    `error` is an exception or its text. Ray wraps a trial's error several times (RayTaskError ->
    Train's WorkerGroupError -> the worker's exception, its traceback as text, terminal colours):
    unwrap to the innermost exception, drop colour codes and traceback lines, keep the last
    meaningful line (a traceback's last, a message's first). A worker that died (SIGKILL, out of
    memory) says so."""
    prefix = ""
    seen: set[int] = set()
    while isinstance(error, BaseException) and id(error) not in seen:
        seen.add(id(error))
        failures = getattr(error, "worker_failures", None)  # ray.train.WorkerGroupError
        if failures:
            rank = min(failures)
            error = failures[rank]
            if len(failures) > 1:
                prefix = f"{len(failures)} workers failed; rank {rank}: "
            continue
        for attr in ("cause", "controller_failure", "_base_exc"):  # RayTaskError, ControllerError, a user exception
            inner = getattr(error, attr, None)
            if isinstance(inner, BaseException):
                error = inner
                break
        else:
            if isinstance(getattr(error, "health_check_failure", None), BaseException):  # the worker process died
                first = _pick(str(error.health_check_failure))
                return _cut(prefix + "a training worker died (killed, out of memory or crashed)"
                            + (f": {first}" if first else ""), limit)
            break
    text = _pick(str(error if error is not None else ""))
    # The exception's own message; a built-in's class name too, since "'lr'" alone says nothing.
    if isinstance(error, BaseException) and (type(error).__module__ == "builtins" or not text):
        text = f"{type(error).__name__}: {text}".rstrip(": ")
    return _cut(prefix + text, limit)


def _pick(text: str) -> str:
    """The last meaningful line of a traceback (where the error is), the first of a plain message."""
    lines = _lines(text)
    if not lines:
        return ""
    line = lines[-1] if "Traceback (most recent call last)" in text else lines[0]
    return re.sub(r"^(?:\w+\.)+(\w+: )", r"\1", line)  # `ray.exceptions.X: ...` -> `X: ...`


def _lines(text: str) -> list[str]:
    out = []
    for line in ANSI.sub("", text).splitlines():
        line = line.strip()
        if line and not _NOISE.match(line):
            out.append(line)
    return out


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def result_row(trial_id: str, status: str, reason: str, config: dict, metrics: dict) -> dict:
    """The results-table row of one trial: id, status, recipe and lr, the other searched values as
    `param/<name>`, the trial-level aggregates, the recipe's size, and how many stages it finished."""
    row = {"trial_id": trial_id, "status": status, "reason": reason, "recipe": config.get("recipe"),
           "lr": float(config["lr"]) if config.get("lr") is not None else float("nan")}
    row.update({f"param/{k}": v for k, v in config.items() if k not in ("recipe", "lr")})
    for k in (*objective.AGGREGATES, *SIZE_COLUMNS):
        row[k] = metrics.get(k, float("nan"))
    row["stages_completed"] = int(metrics.get("stage", 0))
    return row


def collect(results, cfg, base_metrics: dict, optuna_numbers: dict | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(results table, stage table: one row per trial and stage, stage 0 = the base) from Tune's ResultGrid.
    With `optuna_numbers` (Tune trial id -> Optuna trial number) the table has an `optuna_trial` column."""
    rows, stages = [], []
    for r in results:
        last = r.metrics or {}
        tid = last.get("trial_id") or (r.path.rstrip("/").split("_")[-2] if r.path else "?")
        status, reason = trial_status(last, len(cfg.stages))
        if r.error is not None:
            status, reason = "failed", failure_reason(r.error)
        rows.append(result_row(tid, status, reason, r.config or {}, last))
        if optuna_numbers is not None:
            rows[-1]["optuna_trial"] = optuna_numbers.get(tid)
        df = r.metrics_dataframe
        if df is not None and len(df):
            df = df.drop_duplicates("stage", keep="last")
            stages.append({"trial_id": tid, "stage": 0, "skill": "", **base_metrics})
            for _, m in df.iterrows():
                stages.append({"trial_id": tid, "stage": int(m["stage"]), "skill": m.get("stage_skill", ""),
                               **{k: m[k] for k in df.columns if k.startswith(("target/", "heldout/", "probe/"))}})
    res, st = pd.DataFrame(rows), pd.DataFrame(stages)
    if len(st):
        cols = [f"heldout/{h}/acc" for h in cfg.heldout_names if f"heldout/{h}/acc" in st]
        st["heldout_mean"] = st[cols].mean(axis=1)
    return res, st


def load_results(storage_dir) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Read a sweep's results.csv and stages.csv from its storage folder."""
    folder = Path(storage_dir)
    for name in (RESULTS_FILE, STAGES_FILE):
        if not (folder / name).is_file():
            raise ResultsNotFound(
                f"no {name} in {folder}: the sweep may not have finished any trial yet, "
                "or this is not a sweep's storage folder"
            )
    results = pd.read_csv(folder / RESULTS_FILE, dtype={"trial_id": str, "recipe": str})
    stages = pd.read_csv(folder / STAGES_FILE, dtype={"trial_id": str, "skill": str})
    stages["skill"] = stages["skill"].fillna("")  # stage 0 (base) trained no skill
    # CSV turns an int param with gaps (a conditional one such as lora_rank) into floats; give
    # it back its integers so an exported recipe says `lora_rank: 8`, not `8.0`.
    for c in results.columns:
        col = results[c]
        if c.startswith("param/") and col.dtype.kind == "f" and col.notna().any():
            if (col.dropna() % 1 == 0).all():
                results[c] = col.astype("Int64")
    return results, stages


class Store:
    """The sweep's folder: a local path, or a URI that pyarrow reaches (s3://, gs://, ...) so a
    multi-node sweep keeps its tables next to the Tune state every node writes."""

    def __init__(self, root: str):
        self.root = root.rstrip("/")
        self.is_uri = is_uri(root)
        if self.is_uri:
            import pyarrow.fs

            self.fs, self.base = pyarrow.fs.FileSystem.from_uri(self.root)
        else:
            self.local = Path(root)

    def exists(self, rel: str) -> bool:
        if not self.is_uri:
            return (self.local / rel).exists()
        import pyarrow.fs

        return self.fs.get_file_info(f"{self.base}/{rel}").type != pyarrow.fs.FileType.NotFound

    def read_text(self, rel: str) -> str:
        if not self.is_uri:
            return (self.local / rel).read_text()
        with self.fs.open_input_stream(f"{self.base}/{rel}") as f:
            return f.read().decode()

    def write_text(self, rel: str, text: str) -> None:
        if not self.is_uri:
            (self.local / rel).parent.mkdir(parents=True, exist_ok=True)
            (self.local / rel).write_text(text)
            return
        self.fs.create_dir(f"{self.base}/{rel}".rsplit("/", 1)[0], recursive=True)
        with self.fs.open_output_stream(f"{self.base}/{rel}") as f:
            f.write(text.encode())

    def put(self, local_file: Path, rel: str) -> None:
        with open(local_file, "rb") as src, self.fs.open_output_stream(f"{self.base}/{rel}") as dst:
            dst.write(src.read())


def reference(objective_cfg) -> dict[str, float]:
    """The hypervolume's reference point {objective: value} from a sweep's `objective` section
    (an ObjectiveConfig, or the mapping sweep.json holds; keys it lacks take their defaults)."""
    from lmm_ray.schema import ObjectiveConfig

    get = objective_cfg.get if isinstance(objective_cfg, dict) else lambda k, d: getattr(objective_cfg, k, d)
    default = ObjectiveConfig()
    return {name: float(get(f"reference_{name}", getattr(default, f"reference_{name}"))) for name, _ in objective.VECTOR}


def hypervolume_note(res: pd.DataFrame, ref: dict) -> str:
    hv = pareto.front_hypervolume(res, ref=ref)
    # The volume only counts trials better than the reference on all three objectives at once.
    return (f"hypervolume {hv:.4g} against the reference point ({pareto.format_reference(ref)}; objective.reference_*)"
            + (" - no trial is better than it in every objective" if hv == 0 else ""))


def picks(res: pd.DataFrame) -> dict[str, str]:
    """{pick: trial id} for every pareto.PICKS on the front; empty when no trial finished."""
    if not (res["status"] == "finished").any():
        return {}
    return {how: str(pareto.pick(res, how)["trial_id"]) for how in pareto.PICKS}


def _rows_within(table: str, budget: int, what: str) -> str:
    """A markdown table cut to its first rows that fit in `budget` characters, saying what was cut."""
    lines = table.split("\n")
    keep = lines[:2]
    for row in lines[2:]:
        if sum(len(x) + 1 for x in keep) + len(row) + 80 > budget:
            return "\n".join(keep) + f"\n\n({len(lines) - len(keep)} more {what}: see {RESULTS_FILE} in the artifacts)"
        keep.append(row)
    return table


def describe(cfg, res: pd.DataFrame, front: pd.DataFrame, chosen: dict[str, str], names: dict[str, str],
             limit: int = 8000) -> str:
    """The sweep's result as markdown (the parent run's description in MLflow), within `limit`
    characters (MLflow's longest tag value): long tables keep their first rows. `names`: trial id
    -> MLflow run name."""
    counts = ", ".join(f"{n} {s}" for s, n in res["status"].value_counts().items())
    ref = reference(cfg.objective)
    lines = [f"**Sweep `{cfg.name}`**: {len(res)} trials ({counts}), model `{cfg.model}`.",
             f"Steps of each trial run: {', '.join(['0 base', *(f'{i} {n}' for i, n in enumerate(cfg.stage_names, 1))])}. "
             "Accuracies and changes in percentage points; counting bias is a probability change.", "",
             "### Pareto-optimal trials (learning up, held-out change up, counting bias down)", "",
             hypervolume_note(res, ref) + ".", ""]
    if chosen:
        lines.append("Picks: " + "; ".join(f"**{how}** = {names.get(t, t)} (trial `{t}`)" for how, t in chosen.items()) + ".")
        lines += ["Trial runs carry the tags `pareto_optimal` (true/false) and `pick`; filter the runs table "
                  "with `tags.pareto_optimal = 'true'`.", ""]
    head = "\n".join(lines)
    on_front = pareto.format_markdown(front) if len(front) else "(no finished trial)"
    on_front = _rows_within(on_front, (limit - len(head)) * 2 // 3, "Pareto-optimal trials")
    head += "\n" + on_front + "\n\n### All trials (best objective first)\n\n"
    shown = res.assign(_unfinished=res["status"] != "finished").sort_values(["_unfinished", "objective"], ascending=[True, False])
    table = pareto.format_markdown(shown.drop(columns="_unfinished"), front_ids=set(front["trial_id"]))
    return head + _rows_within(table, limit - len(head), "trials")


def finished_best(res: pd.DataFrame) -> pd.Series:
    """The trial with the best scalar objective among trials that finished every stage: a stopped
    trial's objective is that of an early stage (before later stages add forgetting) and would win."""
    done = res[res["status"] == "finished"]
    return (done if len(done) else res).sort_values("objective", ascending=False).iloc[0]


def write_tables(cfg, res: pd.DataFrame, st: pd.DataFrame, store: Store | None = None) -> tuple[str, list[Path], pd.DataFrame]:
    """Write the tables and plots into the sweep's folder; return (the summary text, the files, the front)."""
    store = store or Store(cfg.sweep_dir)
    out = store.local if not store.is_uri else Path(tempfile.mkdtemp(prefix="lmm_ray-summary-"))
    out.mkdir(parents=True, exist_ok=True)
    res.to_csv(out / RESULTS_FILE, index=False)
    st.to_csv(out / STAGES_FILE, index=False)
    front = pareto.front(res) if (res["status"] == "finished").any() else res.iloc[0:0]
    lines = [f"\n== sweep {cfg.name}: {len(res)} trials ({', '.join(f'{n} {s}' for s, n in res['status'].value_counts().items())})"]
    # finished trials first: the objective of a stopped trial is an early stage's, not comparable
    shown = res.assign(_unfinished=res["status"] != "finished").sort_values(["_unfinished", "objective"], ascending=[True, False])
    lines.append(pareto.format_table(shown.drop(columns="_unfinished"), front_ids=set(front["trial_id"])))
    failed = res[res["status"] == "failed"]
    if len(failed):  # the table's status column says "failed"; here is why, one line each
        lines.append("\nfailed trials:")
        lines += [f"  {r.trial_id} ({r.recipe}, lr {pareto.fmt_lr(float(r.lr))}): {r.reason}" for r in failed.itertuples()]
    lines.append("\n== Pareto-optimal trials (learning up, held-out change up, counting bias down):")
    lines.append(pareto.format_table(front) if len(front) else "(no finished trial)")
    lines.append(hypervolume_note(res, reference(cfg.objective)))
    files = [out / RESULTS_FILE, out / STAGES_FILE]
    if len(front):
        front.to_csv(out / PARETO_FILE, index=False)
        files.append(out / PARETO_FILE)
        colours = pareto.recipe_colours(res["recipe"].astype(str))  # one colour per recipe in both plots
        files.append(pareto.plot_tradeoff(res, out / "tradeoff.png", colours=colours))
        labels = [f"{r.recipe} lr={pareto.fmt_lr(r.lr)}" for r in front.itertuples()]
        title = (f"Held-out accuracy after each stage: the {len(front)} Pareto-optimal trial(s) of {len(res)}"
                 if len(front) < len(res) else "Held-out accuracy after each stage: every trial")
        files.append(pareto.plot_stages(st, list(front["trial_id"]), labels, out / "heldout_by_stage.png",
                                        colours=[colours[str(r)] for r in front["recipe"]], title=title))
    if store.is_uri:
        for f in files:
            store.put(f, f.name)
    lines.append(f"\nresults: {cfg.sweep_dir}/{RESULTS_FILE}")
    return "\n".join(lines), files, front
