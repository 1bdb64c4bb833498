"""Evaluation throughput: samples/second of `evaluate` at batch 64 vs batch 1.

    python benchmarks/eval_throughput.py [--model tiny:qwen2_5_vl] [--n 64] [--repeats 3] [--threads T]

Every held-out skill, n samples each, the same encoded samples for both batch sizes (encoding
is done once, outside the timing, as in a sweep). Each batch size gets one warm-up run, then
the median of `repeats` timed runs. The time includes decoding, scoring and the probe.
"""

from __future__ import annotations

import argparse
import os

# Before torch loads: with OpenMP's default spin-waiting, torch threads on cores shared with
# other tenants' jobs run many times slower (tests/conftest.py sets the same).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

from lmm_ray import evaluate as ev  # noqa: E402
from lmm_ray import models, skills  # noqa: E402


def timed(loaded, sets, batch_size: int, repeats: int) -> tuple[float, list[float]]:
    n = sum(len(s) for s in sets.values())
    ev.evaluate(loaded.model, loaded.processor, sets, batch_size=batch_size)  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        ev.evaluate(loaded.model, loaded.processor, sets, batch_size=batch_size)
        times.append(time.perf_counter() - t)
    return n / statistics.median(times), times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny:qwen2_5_vl")
    p.add_argument("--n", type=int, default=64, help="samples per held-out skill")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch-sizes", default="64,1")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: torch's own, one per core); 1 is far steadier on shared cores")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)

    loaded = models.load_model(a.model)
    names = skills.heldout_skills()
    sets = ev.generated_eval_sets(loaded.processor, names, a.n, seed=0)
    total = sum(len(s) for s in sets.values())
    print(f"# {a.model}: {len(names)} held-out skills x {a.n} = {total} samples; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}, "
          f"{platform.processor() or platform.machine()}")
    rows = []
    for bs in (int(b) for b in a.batch_sizes.split(",")):
        rate, times = timed(loaded, sets, bs, a.repeats)
        rows.append((bs, rate, times))
    # On shared cores the fastest run is the least disturbed one, so it is shown beside the median.
    print(f"{'batch':>5}  {'samples/s':>9}  {'median s':>8}  {'best samples/s':>14}  runs (s)")
    for bs, rate, times in rows:
        print(f"{bs:>5}  {rate:9.1f}  {statistics.median(times):8.2f}  {total / min(times):14.1f}  "
              + " ".join(f"{t:.2f}" for t in times))
    if len(rows) >= 2:
        (b0, r0, t0), (b1, r1, t1) = rows[0], rows[-1]
        print(f"ratio batch {b0} / batch {b1}: {r0 / r1:.1f}x (median), {min(t1) / min(t0):.1f}x (best)")


if __name__ == "__main__":
    main()
