"""In-process lmms-eval: what each part of `lmms_backend.run_tasks` costs on the local test task.

    python benchmarks/lmms_backend_time.py [--model base:qwen2_5_vl@ci] [--repeats 3]

The task is tests/test_lmms_backend.py's (8 generated chart images in a parquet file, 7 kept by
`process_docs`, lmms-eval's ChartQA functions). Times: importing lmms-eval after torch and
transformers, indexing its task files (TaskManager, once per process and include_path), the first
`run_tasks` (loads the parquet into the datasets cache) and the median of the next `repeats`; and,
for scale, lmm_ray's own `evaluate` on the same 7 samples.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import transformers  # noqa: E402,F401

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="base:qwen2_5_vl@ci")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from lmm_ray import evaluate, models, skills
    from lmm_ray import lmms_backend as LB
    from lmm_ray.skills.loaders import apply_sampling

    t = time.perf_counter()
    LB.require()
    t_import = time.perf_counter() - t
    from test_lmms_backend import BATCH, KEEP, MAX_NEW_TOKENS, ROWS, TASK, write_task

    inc = write_task(Path(tempfile.mkdtemp(prefix="lmms_bench_")))
    t = time.perf_counter()
    LB.task_manager(inc)
    t_index = time.perf_counter() - t
    loaded = models.load_model(args.model)
    loaded.model.eval()
    times = []
    for _ in range(1 + args.repeats):
        t = time.perf_counter()
        out = LB.run_tasks(loaded.model, loaded.processor, {"chart": TASK}, batch_size=BATCH, include_path=inc)
        times.append(time.perf_counter() - t)
    samples = apply_sampling([s for k, n in ROWS for s in skills.generate(k, n, seed=evaluate.eval_seed(0))],
                             f"random:{KEEP}", 0)
    es = evaluate.build_eval_sets(loaded.processor, {"chart": samples}, {"chart": "heldout"})
    t = time.perf_counter()
    evaluate.evaluate(loaded.model, loaded.processor, es, batch_size=BATCH, max_new_tokens=MAX_NEW_TOKENS)
    t_own = time.perf_counter() - t
    r = out["chart"]
    print(f"model {args.model}, {r['n']} docs, score {r['score']:.1f} ({r['metric']}), load average "
          f"{os.getloadavg()[0]:.1f}")
    print(f"import lmms_eval (torch, transformers loaded): {t_import:.1f} s")
    print(f"TaskManager index (lmms-eval's tasks + the local one): {t_index:.1f} s")
    print(f"run_tasks first call: {times[0]:.2f} s; next {args.repeats}: median {statistics.median(times[1:]):.2f} s")
    print(f"lmm_ray evaluate on the same samples (encoding outside): {t_own:.2f} s")


if __name__ == "__main__":
    main()
