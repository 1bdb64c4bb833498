"""`lmm-ray` verbs. Thin: parse arguments, call the module that owns the work, print.

Errors a user can fix (bad config, unknown recipe, missing file) print one clear message and
exit with code 2, before anything expensive starts. The help texts below are the user's manual
(`lmm-ray --help`, `lmm-ray VERB --help`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

from lmm_ray.errors import Interrupted, ResultsNotFound, UserError
from lmm_ray.schema import mask_secrets

EXIT_USAGE = 2
EXIT_BUG = 1
DEBUG_ENV = "LMM_RAY_DEBUG"  # 1: tracebacks of user errors too, Ray's logs at debug level
RAY_LOGS = "/tmp/ray/session_latest/logs"

DESCRIPTION = """\
Find how to fine-tune a multimodal model on new skills without erasing what it knows:
sweep fine-tuning recipes (which parameters to train, learning rate, ...) and keep the
Pareto-optimal ones (learning up, held-out change up, counting bias down).

The flow:
  lmm-ray validate sweeps/quickstart.yaml     check a sweep file (model, recipes, data, resources)
  lmm-ray sweep sweeps/quickstart.yaml        run it: every trial trains, is evaluated, logged to MLflow
  lmm-ray pareto runs/quickstart              the Pareto-optimal trials; --export choice.yaml keeps one
  lmm-ray ui runs/quickstart                  browse the trials in the MLflow UI
  lmm-ray train sweeps/quickstart.yaml --choice choice.yaml --output trained/
                                              train the chosen recipe, save a normal model folder

Also: recipes (what each recipe trains), eval (score a model), base (the embedded base model),
score (re-score saved predictions). `lmm-ray VERB --help` explains each verb; every sweep-file
key is in docs/sweep_config.md.
"""

def _fmt_int(n: int) -> str:
    return f"{n:,}"


# ---------------------------------------------------------------------------------------------
# recipes


def cmd_recipes(a) -> int:
    from lmm_ray import families, models, recipes

    custom = recipes.load_recipe_file(a.recipe_file) if a.recipe_file else None
    if a.model:
        fam, cfg = models.model_config(a.model)
        model = models.meta_model(fam, cfg)
    else:
        fam = families.get_family(a.family)
        model = models.build_tiny(a.family).model
    table = recipes.audit(model, fam, a.recipe or None, custom)
    if a.json:
        print(json.dumps(table, indent=None if a.compact else 2))
        return 0
    roles = [r for r in families.ROLE_ORDER if any(r in row["roles"] for row in table.values())]
    roles += sorted({r for row in table.values() for r in row["roles"]} - set(roles))
    head = ["recipe", "trainable", "share"] + roles
    rows = [
        [name, _fmt_int(row["trainable"]), f"{100 * row['trainable'] / row['total']:.2f}%"]
        + [_fmt_int(row["roles"].get(r, 0)) if row["roles"].get(r) else "-" for r in roles]
        for name, row in table.items()
    ]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    total = next(iter(table.values()))["total"]
    print(f"# {a.model or 'tiny:' + a.family} ({fam.name}): {_fmt_int(total)} parameters")
    for r in [head, *rows]:
        print("  ".join(str(x).rjust(w) if i else str(x).ljust(w) for i, (x, w) in enumerate(zip(r, widths))))
    return 0


# ---------------------------------------------------------------------------------------------
# eval


def _skill_names(arg: str | None) -> list[str]:
    from lmm_ray import skills

    names = list(dict.fromkeys(s.strip() for s in arg.split(",") if s.strip())) if arg else (
        skills.target_skills() + skills.heldout_skills())
    if not names:
        raise UserError("--skills names no skill")
    for n in names:
        skills.get_skill(n)  # unknown name -> UnknownName listing the valid ones (exit 2)
    return names


def cmd_eval(a) -> int:
    from lmm_ray import evaluate, models

    names = _skill_names(a.skills)  # before loading anything: a typo costs nothing
    if a.n < 1 or a.batch_size < 1:
        raise UserError("--n and --batch-size must be >= 1")
    loaded = models.load_model(a.model)
    sets = evaluate.generated_eval_sets(loaded.processor, names, a.n, a.seed, a.image_size)
    report = evaluate.evaluate(loaded.model, loaded.processor, sets, batch_size=a.batch_size)
    metrics = report.metrics()
    if a.json:
        print(json.dumps({"model": a.model, "n": a.n, "metrics": metrics}))
        return 0
    print(f"# {a.model}: {a.n} samples per skill, eval seed {evaluate.eval_seed(a.seed)} (accuracy in pp)")
    w = max(len(n) for n in names + ["held-out skills"]) - 2
    for kind, title in (("target", "target skills"), ("heldout", "held-out skills")):
        rows = [r for r in report.results.values() if r.kind == kind]
        if not rows:
            continue
        print(f"{title:<{w + 2}}  {'acc':>6}  {'chance':>6}")
        for r in rows:
            chance = f"{r.chance:6.1f}" if r.chance is not None else f"{'?':>6}"
            print(f"  {r.skill:<{w}}  {r.acc:6.1f}  {chance}")
        print(f"  {'mean':<{w}}  {metrics[kind + '/mean_acc']:6.1f}")
    if report.probe:
        print("probe on held-out prompts (base: none, so no counting bias / KL)")
        for k, v in report.probe.items():
            unit = " nats" if k.endswith("entropy") else " pp" if k.endswith("acc") or "acc_" in k else ""
            print(f"  {k.removeprefix('probe/'):<22}  {v:8.4g}{unit}")
    return 0


# ---------------------------------------------------------------------------------------------
# base, validate, sweep, pareto, train, ui


def cmd_base(a) -> int:
    from lmm_ray import base

    ref = f"base:{a.family}" + (f"@{a.preset}" if a.preset else "")
    if a.action == "build" and (a.verify or a.ship):
        if a.ship:
            print(f"{ref}: shipped as {base.ship(ref)}")
            return 0
        ok, lines = base.rebuild(ref)
        print("\n".join(lines) + f"\n{ref}: {'bit-exact rebuild' if ok else 'the rebuild DIFFERS from the shipped copy'}")
        return 0 if ok else 1
    if a.action == "build":
        t0 = time.time()
        path = base.ensure(ref, force=a.force)
        info = base.info(ref)
        m = info["metrics"]
        print(f"{ref}: {path} (built in {info['build_seconds']:.0f} s; this call took {time.time() - t0:.1f} s)")
        print(f"  held-out mean {m['heldout/mean_acc']:.1f} pp, target mean {m['target/mean_acc']:.1f} pp")
    else:
        path = base.folder(*base.parse_ref(ref))
        problem = base.verify(path)
        print(f"{ref}: {path} ({'ready' if problem is None else problem})")
    return 0


def _load_cfg(a):
    from lmm_ray import config

    return config.load_sweep(a.sweep, a.overrides)


def cmd_validate(a) -> int:
    from lmm_ray import validate

    cfg = _load_cfg(a)
    print(validate.check(cfg, address=getattr(a, "address", None), offline=a.offline, check_data=a.check_data))
    print("\nvalid" + (" (offline: model configuration only, no network)" if a.offline else ""))
    return 0


def cmd_sweep(a) -> int:
    from lmm_ray import private, sweep

    old = private.private_umask()  # what this driver and the Ray it starts write is yours only (private.py)
    try:
        sweep.run(_load_cfg(a), resume=a.resume, address=a.address)  # validates first, before Ray starts
    finally:
        os.umask(old)  # (cli.main also runs in-process, from tests and notebooks)
    return 0


def _sweep_dir(ref: str) -> "Path":
    """A sweep file, a sweep name (under ./runs) or a sweep's storage folder."""
    from pathlib import Path

    p = Path(ref)
    if p.is_file():
        from lmm_ray import config

        return Path(config.load_sweep(p).sweep_dir)
    if p.is_dir():
        return p
    if (Path("runs") / ref).is_dir():
        return Path("runs") / ref
    raise UserError(f"no sweep at {ref!r}: give a sweep file, a storage folder, or the name of a sweep under ./runs")


def _reference(a, d: Path) -> dict:
    """The hypervolume's reference point: --reference, else the sweep's objective.reference_*."""
    from lmm_ray import results

    saved = d / "sweep.json"
    if Path(a.sweep).is_file():
        from lmm_ray import config

        ref = results.reference(config.load_sweep(a.sweep).objective)
    else:
        ref = results.reference(json.loads(saved.read_text()).get("objective", {}) if saved.is_file() else {})
    for item in filter(None, (a.reference or "").split(",")):
        key, eq, value = item.partition("=")
        if not eq or key.strip() not in ref:
            raise UserError(f"--reference {a.reference!r}: write KEY=VALUE pairs with keys {', '.join(ref)}")
        try:
            ref[key.strip()] = float(value)
        except ValueError:
            raise UserError(f"--reference: {value!r} is not a number") from None
    return ref


def cmd_pareto(a) -> int:
    from lmm_ray import pareto, results

    d = _sweep_dir(a.sweep)
    try:
        res, _ = results.load_results(d)
    except ResultsNotFound:
        if not Path(a.sweep).is_file():
            raise
        from lmm_ray import config, tracking

        cfg = config.load_sweep(a.sweep)  # no results file: rebuild the table from the MLflow runs
        res = tracking.results_from_mlflow(cfg.mlflow_uri, cfg.experiment, cfg.name)
        if res.empty:
            raise UserError(f"sweep {cfg.name!r} has no results in {d} and no trial runs in MLflow "
                            f"({mask_secrets(cfg.mlflow_uri)})")
        print(f"# {d} has no results.csv: read {len(res)} trials from MLflow", file=sys.stderr)
    front = pareto.front(res)
    ref = _reference(a, d)
    if a.json:
        print(json.dumps({"front": json.loads(front.to_json(orient="records")), "hypervolume": pareto.front_hypervolume(res, ref=ref),
                          "reference": ref, "trials": len(res)}, indent=1))
    else:
        print(f"# {d}: {len(res)} trials; * = Pareto-optimal (learning up, held-out change up, counting bias down); "
              "trial = Tune's id (MLflow tag lmm_ray.trial_id), optuna = Optuna's trial number (the run name's #)")
        print(pareto.format_table(res.sort_values("objective", ascending=False), front_ids=set(front["trial_id"])))
        print(f"\n{results.hypervolume_note(res, ref)}")
    if a.plot:
        print(f"plot: {pareto.plot_tradeoff(res, a.plot)}", file=sys.stderr)
    if a.export:
        row = pareto.pick(res, a.pick)
        pareto.export_recipe(row, a.export, sweep=str(d), how=a.pick)
        print(f"exported trial {row['trial_id']} ({a.pick}: {row['recipe']}, lr={row['lr']:.3g}) to {a.export}", file=sys.stderr)
    return 0


def cmd_memory(a) -> int:
    from lmm_ray import memory

    try:
        est = memory.estimate(a.model, a.recipe, workers=a.workers, strategy=a.strategy, batch=a.batch,
                              seq_len=a.seq_len, grad_ckpt=a.grad_ckpt, weight_dtype=a.weight_dtype,
                              compute_dtype=a.compute_dtype, image_tokens=a.image_tokens)
    except (ValueError, OSError) as e:  # an unknown recipe, model or dtype
        raise UserError(str(e)) from None
    if a.json:
        out = {**est, "per_gpu_gib": round(est["per_gpu_gib"], 3)}
        if a.budget_gib is not None:
            out["fits"] = memory.fits(est, a.budget_gib)
            out["suggestions"] = memory.suggest(est, a.budget_gib)
        print(json.dumps(out, indent=1))
    else:
        print(memory.format_table(est, a.budget_gib))
    return 0


def cmd_score(a) -> int:
    from lmm_ray import score

    r = score.score_file(a.predictions, a.metric, a.aggregation)
    print(json.dumps(r) if a.json else score.format_result(r))
    return 0


def cmd_train(a) -> int:
    from lmm_ray import final

    final.train_choice(a.sweep, a.choice, a.output, overrides=a.overrides, address=a.address)
    return 0


def cmd_ui(a) -> int:
    from lmm_ray import config, ui

    if a.sweep and Path(a.sweep).is_file():
        cfg = config.load_sweep(a.sweep)
        uri, experiment, name = cfg.mlflow_uri, cfg.experiment, cfg.name
    else:
        d = _sweep_dir(a.sweep) if a.sweep else None
        if d is None or not (d / "mlflow.db").exists():
            raise UserError("give a sweep file, or the folder of a sweep that uses the default sqlite store "
                            "(e.g. lmm-ray ui runs/quickstart)")
        uri = f"sqlite:///{(d / 'mlflow.db').resolve()}"
        saved = json.loads((d / "sweep.json").read_text()) if (d / "sweep.json").is_file() else {}
        name = saved.get("name", d.name)
        experiment = (saved.get("tracking") or {}).get("experiment") or name
    if ui.port_busy(a.port):
        raise UserError(f"port {a.port} on {ui.HOST} is already in use (an MLflow UI started before is still "
                        f"running?): open it in the browser, stop it, or pick another port: --port {a.port + 1}")
    exp_id, parent = ui.sweep_ids(uri, experiment, name)
    base = ui.base_url(a.port)
    print(f"MLflow UI for sweep {name!r} ({uri}); Ctrl-C to stop", flush=True)
    for line in ui.urls_text(base, exp_id, parent):
        print("  " + line, flush=True)
    env = dict(os.environ) if a.full else {**os.environ, **ui.LEAN_ENV}
    return ui.serve(ui.server_argv(uri, a.port, workers=4 if a.full else 1), env)


# ---------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lmm-ray", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True, metavar="VERB", title="verbs")

    r = sub.add_parser("recipes", help="trainable parameters of every recipe, per role",
                       description="Show which parameters each recipe trains: the count per role (attention "
                                   "projections, MLP, vision tower, ...) and the share of the model.")
    g = r.add_mutually_exclusive_group()
    g.add_argument("--family", default="qwen2_5_vl", help="tiny model of this family (default qwen2_5_vl)")
    g.add_argument("--model", help="a model reference: hub id, local folder, tiny:<family>, base:<family>")
    r.add_argument("--recipe", action="append", metavar="NAME", help="only this recipe (repeatable)")
    r.add_argument("--recipe-file", help="YAML file of user-defined recipes to include")
    r.add_argument("--json", action="store_true", help="print {recipe: {trainable, total, roles}} as JSON")
    r.add_argument("--compact", action="store_true", help=argparse.SUPPRESS)
    r.set_defaults(fn=cmd_recipes)

    e = sub.add_parser("eval", help="accuracy per generated skill (pp) and the counting-bias probe",
                       description="Evaluate one model on the generated skills: accuracy per skill in percentage "
                                   "points, and the probe statistics (probability mass on number tokens, entropy).")
    e.add_argument("--model", required=True, help="hub id, local folder, tiny:<family>, base:<family>")
    e.add_argument("--skills", help="comma-separated skill names (default: every generated target and held-out skill)")
    e.add_argument("--n", type=int, default=64, help="samples per skill (default 64)")
    e.add_argument("--batch-size", type=int, default=64, help="prompts per generate call (default 64)")
    e.add_argument("--seed", type=int, default=0, help="evaluation stream; samples come from seed 10000+S")
    e.add_argument("--image-size", type=int, default=None, help="image side in pixels (default: the skills' default)")
    e.add_argument("--json", action="store_true", help='print one JSON object {"model", "n", "metrics"}')
    e.set_defaults(fn=cmd_eval)

    b = sub.add_parser("base", help="build (or locate) the embedded base model",
                       description="The embedded base model (base:<family>@<preset>): a tiny model pre-trained on the "
                                   "held-out skills, cached in ~/.cache/lmm_ray. `build` trains it if missing (minutes on "
                                   "a CPU); `path` prints where it is and whether it is ready.")
    b.add_argument("action", choices=["build", "path"], help="build: train it if not cached; path: print its folder")
    b.add_argument("--family", default="qwen2_5_vl", help="model family (default qwen2_5_vl)")
    b.add_argument("--preset", help="quickstart | ci (default: the family's first preset)")
    b.add_argument("--force", action="store_true", help="rebuild even when cached")
    b.add_argument("--verify", action="store_true", help="rebuild in a temporary folder; compare sha256 with the shipped copy")
    b.add_argument("--ship", action="store_true", help="copy the build into the package (lmm_ray/bases) with its key")
    b.set_defaults(fn=cmd_base)

    def sweep_args(q, resume: bool = False):
        q.add_argument("sweep", help="sweep YAML file (docs/sweep_config.md)")
        q.add_argument("overrides", nargs="*", help="key=value overrides, e.g. search.num_trials=4 stages.0.steps=50")
        q.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray)")

    v = sub.add_parser("validate", help="check a sweep file (and its model, recipes, data, resources) and print the plan",
                       description="Run every check that can fail before Ray starts: the file's keys and values, the "
                                   "model's configuration, every recipe the search space can produce, data files, "
                                   "resources, the MLflow server. Prints the plan; exit 2 with the fix on a problem.")
    sweep_args(v)
    v.add_argument("--offline", action="store_true", help="model configuration only: no weights, no network")
    v.add_argument("--check-data", action="store_true",
                   help="also read each hub dataset's schema (features only, no images; needs the network)")
    v.set_defaults(fn=cmd_validate)

    sw = sub.add_parser("sweep", help="run a sweep: Optuna on Ray Tune, trials on Ray Train, MLflow tracking",
                        description="Validate, then run the sweep: Optuna proposes recipes, each trial trains through "
                                    "the stages on Ray Train and is evaluated after each; every trial is a run in MLflow. "
                                    "Ends with the results and Pareto tables, where they are (storage/<name>), the MLflow "
                                    "UI's URL and the Optuna dashboard's command.")
    sweep_args(sw)
    sw.add_argument("--resume", action="store_true", help="continue an interrupted sweep (finished trials are kept); "
                    "it loads pickled Tune state, so the sweep folder must be yours and not writable by others")
    sw.set_defaults(fn=cmd_sweep)

    pa = sub.add_parser("pareto", help="the Pareto-optimal trials of a sweep, with plot and recipe export",
                        description="Print a sweep's trials with the Pareto-optimal ones marked (learning up, held-out "
                                    "change up, counting bias down) and the front's hypervolume against a reference "
                                    "point; optionally plot them and export one trial's recipe for `lmm-ray train`.")
    pa.add_argument("sweep", help="sweep file, sweep name, or the sweep's storage folder")
    pa.add_argument("--json", action="store_true", help="print the front, its hypervolume and reference point as JSON")
    pa.add_argument("--plot", metavar="PNG", help="write the learning vs held-out change scatter to this PNG")
    pa.add_argument("--export", metavar="YAML", help="write the picked trial as a recipe YAML (usable as a search space "
                                                     "of one trial, search.num_trials=1, and as `lmm-ray train --choice`)")
    pa.add_argument("--pick", default="knee", choices=["knee", "max-learning", "min-forgetting"],
                    help="which front trial --export writes: knee = the most balanced (default), max-learning, "
                         "min-forgetting (highest held-out change)")
    pa.add_argument("--reference", metavar="K=V,...",
                    help="hypervolume reference point, e.g. learning=0,heldout_change=-50,counting_bias=0.2 (default: "
                         "the sweep's objective.reference_*); use one reference to compare sweeps")
    pa.set_defaults(fn=cmd_pareto)

    t = sub.add_parser("train", help="train one chosen configuration through all stages and save the full model",
                       description="Train the recipe picked from a sweep (`lmm-ray pareto --export choice.yaml`) through "
                                   "the sweep's stages and save the whole model as a save_pretrained folder.")
    t.add_argument("sweep", help="sweep YAML file (model, stages, evaluation)")
    t.add_argument("--choice", required=True, help="the picked trial's values, as `lmm-ray pareto --export` writes them")
    t.add_argument("--output", required=True, help="folder for the trained model (save_pretrained)")
    t.add_argument("overrides", nargs="*", help="key=value overrides of the sweep file, e.g. stages.0.steps=200")
    t.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray)")
    t.set_defaults(fn=cmd_train)

    me = sub.add_parser("memory", help="estimated peak GPU memory of a training step, per part (no weights loaded)",
                        description="Estimate the peak memory per GPU of one training step of a recipe (weights, "
                                    "gradients, AdamW states, activations) from the model's configuration alone, and, "
                                    "with --budget-gib, whether it fits and what would make it fit.")
    me.add_argument("model", help="hub id (the study's ship offline configs), local folder, tiny:<family> or base:<family>")
    me.add_argument("--recipe", required=True, help="a recipe name (lmm-ray recipes lists them)")
    me.add_argument("--workers", type=int, default=1, help="GPUs the trial uses (default 1)")
    me.add_argument("--strategy", choices=("ddp", "fsdp"), default="ddp", help="ddp replicates the model; fsdp shards it")
    me.add_argument("--batch", type=int, default=1, help="micro-batch per GPU (default 1)")
    me.add_argument("--seq-len", type=int, default=1024, help="padded tokens per sample, image tokens included (default 1024)")
    me.add_argument("--image-tokens", type=int, default=None, help="image tokens per sample (default: half of --seq-len)")
    me.add_argument("--grad-ckpt", action="store_true", help="with gradient checkpointing")
    me.add_argument("--weight-dtype", default="bf16", help="dtype of the frozen weights: bf16 (default) or fp32")
    me.add_argument("--compute-dtype", default="bf16", help="dtype of activations: bf16 (default) or fp32")
    me.add_argument("--budget-gib", type=float, default=None, help="GPU memory: say whether it fits, and how to make it fit")
    me.add_argument("--json", action="store_true", help='print an object with "per_gpu_gib", "parts" (bytes) and "parts_gib"')
    me.set_defaults(fn=cmd_memory)

    sc = sub.add_parser("score", help="re-score a saved predictions JSONL file with a named metric",
                        description="Score saved predictions with one of the benchmark metrics (lmm_ray/metrics.py), "
                                    "without a model.")
    sc.add_argument("predictions", help="JSONL, one {prediction, answers, [choices], [category]} object a line")
    sc.add_argument("--metric", "-m", required=True,
                    help="exact, choice, anls, relaxed, vqa, clock, number, pathvqa_exact, ... (lmm_ray/metrics.py)")
    sc.add_argument("--aggregation", "-a", default="mean", help="mean (over samples, default) or macro (mean over categories)")
    sc.add_argument("--json", action="store_true", help='print {"metric", "score" (pp, 0-100), "n", "by_category", ...}')
    sc.set_defaults(fn=cmd_score)

    u = sub.add_parser("ui", help="open a sweep's runs in the MLflow UI (on 127.0.0.1)",
                       description="Start the MLflow UI on a sweep's tracking store and print the URL of its runs "
                                   "table (one run per trial, nested under the sweep's run, whose description holds the "
                                   "results and the Pareto front). Refuses (exit 2) when the port is taken. Runs MLflow "
                                   "lean (one web worker, no job runner: ~0.5 GB instead of 2-3 GB).")
    u.add_argument("sweep", nargs="?", help="sweep file, sweep name, or the sweep's storage folder (e.g. runs/quickstart)")
    u.add_argument("--port", type=int, default=5000, help="port on 127.0.0.1 (default 5000)")
    u.add_argument("--full", action="store_true", help="MLflow's own defaults (4 web workers, job execution)")
    u.set_defaults(fn=cmd_ui)
    return p


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may follow options (`train FILE --recipe R k=v`): argparse leaves them over.
    if extra:
        if hasattr(args, "overrides") and all("=" in x and not x.startswith("-") for x in extra):
            args.overrides = [*args.overrides, *extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    debug = os.environ.get(DEBUG_ENV, "").strip() not in ("", "0")
    if debug:  # Ray's own processes read it when they start: GCS, raylet and worker logs at debug level
        os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "debug")
    try:
        return int(args.fn(args) or 0)
    except UserError as e:
        if debug:
            traceback.print_exc()
        print(f"lmm-ray {args.cmd}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except Interrupted as e:  # Ctrl-C: one line that says how to go on, no traceback
        print(f"lmm-ray {args.cmd}: {e} — {_go_on(argv, e.resumable)}", file=sys.stderr, flush=True)
        return e.exit_code
    except Exception:  # a bug, not the user's mistake: the traceback is the report (KeyboardInterrupt passes)
        traceback.print_exc()
        print(bug_hint(args.cmd, debug), file=sys.stderr)
        return EXIT_BUG


def _go_on(argv: list[str] | None, resumable: bool) -> str:
    """The command that continues an interrupted sweep: this one, with --resume (credentials masked)."""
    import shlex

    from lmm_ray.ui import command

    words = [mask_secrets(w) for w in (sys.argv[1:] if argv is None else argv)]
    if not resumable:  # stopped before Tune saved anything: the same command starts it afresh
        return "nothing to resume yet; start it again with: " + " ".join([command(), *map(shlex.quote, words)])
    return "resume with: " + " ".join([command(), *map(shlex.quote, words), *([] if "--resume" in words else ["--resume"])])


def bug_hint(cmd: str, debug: bool) -> str:
    """The line after an unexpected traceback: how to get more detail, and where it goes."""
    from lmm_ray import __version__

    more = "" if debug else f"rerun with {DEBUG_ENV}=1 for more detail (Ray's logs at debug level), then "
    return (f"lmm-ray {cmd}: internal error (a bug in lmm_ray {__version__}, not in your input): {more}report it "
            "to the lmm_ray issue tracker with this traceback, the command line and the sweep file "
            f"(Ray's logs: {RAY_LOGS})")


if __name__ == "__main__":
    sys.exit(main())
