"""Peak memory and throughput of the streaming input pipeline (lmm_ray/stream.py) on real-sized images.

    python benchmarks/stream_memory.py [--sizes 4000,40000] [--steps 40] [--batch 8] [--images 200]
                                       [--workers 0,2] [--eager 256] [--ray-data] [--json out.json]

Writes `--images` distinct 1024x768 JPEGs once to a temporary folder and, per size, a LLaVA JSON
file of that many records pointing at them round-robin (the loader still opens and decodes each
record's image: nothing is cached). Then, per size, in a fresh subprocess (so peak RSS is that
size's alone): build the stage's plan (`loaders.plan_samples`), and on `tiny:qwen2_5_vl` (every
parameter trained, AdamW, fp32):
  * pipeline: `stream.stage_loader` alone (read, decode, process, collate) for `--steps` steps;
  * train step: forward + backward + AdamW on batches already in memory;
  * pipeline + train: the loader feeding the step, as a stage runs.
Peak RSS is the process's VmHWM (/proc/self/status), measured with 0 loader workers (everything in
the one process). `--workers 0,2` repeats the throughput runs with 2 worker processes. `--eager N`
runs the previous path (`load_samples` + `encode_train`, every image decoded up front) on N records
for comparison. `--ray-data` measures the same pipeline through Ray Data (map + iter_rows, order
preserved) for the DataLoader vs Ray Data choice in stream.py's docstring.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402


def vm(key: str = "VmHWM") -> float:
    """MiB of a /proc/self/status field (VmHWM: peak resident set size)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def write_images(folder: Path, n: int) -> None:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:768, 0:1024]
    for k in range(n):
        # Smooth colour fields plus noise: a JPEG of realistic size (~150 KB) and decode cost.
        base = np.stack([(x * (k + 1) % 256), (y * 3 + k * 7) % 256, ((x + y) // 4 + k) % 256], -1)
        img = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype("uint8")
        Image.fromarray(img).save(folder / f"{k}.jpg", quality=90)


def write_json(path: Path, n: int, n_images: int) -> None:
    recs = [{"id": f"r{i}", "image": f"{i % n_images}.jpg",
             "conversations": [{"from": "human", "value": f"<image>\nHow many objects are there? ({i})"},
                               {"from": "gpt", "value": str(i % 9)}]} for i in range(n)]
    path.write_text(json.dumps(recs))


# ---------------------------------------------------------------------------------------------
# In the child process


def child(a) -> dict:
    import torch

    from lmm_ray import data, models, stream
    from lmm_ray.skills.loaders import plan_samples

    torch.set_num_threads(a.threads)
    src = {"llava_json": a.json_file, "image_folder": a.image_folder}
    base_rss = vm("VmRSS")
    loaded = models.load_model("tiny:qwen2_5_vl")
    model, pad = loaded.model.train(), loaded.tokenizer.pad_token_id
    out = {"size": a.size, "workers": a.workers, "mode": a.mode, "rss_after_import_mib": base_rss}
    if a.mode == "eager":  # the previous path: every image decoded, every sample encoded up front
        t0 = time.perf_counter()
        from lmm_ray.skills.loaders import load_samples

        encs = data.encode_train(loaded.processor, load_samples(src))
        out.update(load_s=time.perf_counter() - t0, peak_rss_mib=vm(), n=len(encs))
        return out
    t0 = time.perf_counter()
    plan = plan_samples(src)
    out["plan_s"] = time.perf_counter() - t0
    out["plan_rss_mib"] = vm("VmRSS")
    kw = dict(pad_id=pad, steps=a.steps, batch_size=a.batch, seed=0, stage=1, num_workers=a.workers)
    samples = a.steps * a.batch

    if a.mode == "ray_data":
        return {**out, **ray_data(plan, loaded.processor, pad, a)}

    t0 = time.perf_counter()
    batches = list(stream.stage_loader(plan, loaded.processor, **{**kw, "steps": 4}))  # warm-up, kept for the step
    out["warmup_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in stream.stage_loader(plan, loaded.processor, **kw):
        pass
    out["pipeline_sps"] = samples / (time.perf_counter() - t0)

    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step(b):
        model(**b).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for b in batches[:2]:
        step(b)
    t0 = time.perf_counter()
    for i in range(a.steps):
        step(batches[i % len(batches)])
    out["train_step_sps"] = samples / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    for b in stream.stage_loader(plan, loaded.processor, **kw):
        step(b)
    out["pipeline_and_train_sps"] = samples / (time.perf_counter() - t0)
    out["peak_rss_mib"] = vm()
    return out


def ray_data(plan, processor, pad: int, a) -> dict:
    """The same micro-batches through Ray Data: one row per micro-batch, encoded and collated by
    `map` in Ray's workers, read back in order."""
    import ray

    from lmm_ray import data, stream

    t0 = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    init_s = time.perf_counter() - t0
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    sampler = stream.StageBatchSampler(len(plan), steps=a.steps, batch_size=a.batch, seed=0, stage=1)

    def encode(row):
        encs = data.LazyEncodings(plan, processor, "train")
        b = data.collate([encs[i] for i in row["idx"]], pad)
        return {k: v.numpy() for k, v in b.items()}

    t0 = time.perf_counter()
    n = 0
    for row in ray.data.from_items([{"idx": mb} for mb in sampler]).map(encode).iter_rows():
        n += row["input_ids"].shape[0]
    sps = n / (time.perf_counter() - t0)
    ray.shutdown()
    return {"ray_init_s": init_s, "pipeline_sps": sps}


# ---------------------------------------------------------------------------------------------
# The parent


def run_child(a, tmp: Path, size: int, workers: int, mode: str) -> dict:
    cmd = [sys.executable, __file__, "--child", "--size", str(size), "--workers", str(workers), "--mode", mode,
           "--steps", str(a.steps), "--batch", str(a.batch), "--threads", str(a.threads),
           "--json-file", str(tmp / f"train_{size}.json"), "--image-folder", str(tmp / "imgs")]
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    if r.returncode:
        raise RuntimeError(f"child {size}/{workers}/{mode} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--sizes", default="4000,40000")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--images", type=int, default=200)
    p.add_argument("--workers", default="0,2")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--eager", type=int, default=0, help="also run the eager path on this many records")
    p.add_argument("--ray-data", action="store_true")
    p.add_argument("--json")
    # child options
    p.add_argument("--child", action="store_true")
    p.add_argument("--size", type=int)
    p.add_argument("--mode", default="stream")
    p.add_argument("--json-file")
    p.add_argument("--image-folder")
    a = p.parse_args()
    if a.child:
        a.workers = int(a.workers)
        print(json.dumps(child(a)))
        return

    sizes = [int(s) for s in a.sizes.split(",")]
    workers = [int(w) for w in a.workers.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        (tmp / "imgs").mkdir()
        t0 = time.perf_counter()
        write_images(tmp / "imgs", a.images)
        for n in sizes + ([a.eager] if a.eager else []):
            write_json(tmp / f"train_{n}.json", n, a.images)
        print(f"# {a.images} JPEGs 1024x768 written in {time.perf_counter() - t0:.1f} s; load {os.getloadavg()[0]:.1f}")
        for n in sizes:
            for w in workers:
                rows.append(run_child(a, tmp, n, w, "stream"))
                print(json.dumps(rows[-1]), flush=True)
        if a.eager:
            rows.append(run_child(a, tmp, a.eager, 0, "eager"))
            print(json.dumps(rows[-1]), flush=True)
        if a.ray_data:
            rows.append(run_child(a, tmp, sizes[0], 0, "ray_data"))
            print(json.dumps(rows[-1]), flush=True)
    peak = {r["size"]: r["peak_rss_mib"] for r in rows if r["mode"] == "stream" and r["workers"] == 0}
    print(f"\n{'records':>8} {'workers':>7} {'peak RSS MiB':>12} {'plan s':>6} {'pipeline/s':>10} {'step/s':>7} {'both/s':>7}")
    for r in rows:
        if r["mode"] == "stream":
            print(f"{r['size']:>8} {r['workers']:>7} {r['peak_rss_mib'] if r['workers'] == 0 else float('nan'):>12.0f} "
                  f"{r['plan_s']:>6.2f} {r['pipeline_sps']:>10.1f} {r['train_step_sps']:>7.1f} {r['pipeline_and_train_sps']:>7.1f}")
    if len(peak) >= 2:
        lo, hi = min(peak), max(peak)
        print(f"peak RSS {hi} / {lo} records: {peak[hi] / peak[lo]:.3f}x (target <= 1.2x)")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
