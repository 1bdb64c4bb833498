"""Where a quickstart training step's time goes (the tiny Qwen2.5-VL, batch 16, sa_proj).

    python benchmarks/step_profile.py [--model base:qwen2_5_vl@quickstart] [--steps 20] [--recipe sa_proj]

The step is optim.train_stage's (forward with labels, backward, clipping, AdamW) on collated
batches of the quickstart's first stage (clock; the profile in docs/benchmarks.md was taken when it was
count), prepared before timing. It prints:
- seconds per step with 1 and 2 torch threads (median of 3 blocks of `steps` steps);
- a torch.profiler breakdown of one block (1 thread): self CPU time of matmul kernels (mm, addmm,
  bmm, SDPA's kernels), of elementwise kernels, of other ATen ops, and the rest of the wall time
  (Python, the dispatcher, autograd bookkeeping);
- Qwen2.5-VL's position ids (`get_rope_index`, recomputed by every forward from input ids and
  image grids) per call, and the step time with them precomputed once and passed as `position_ids`;
- the vision tower's forward per batch (its attention runs one SDPA call per image and layer).
Record `uptime` with it: the cores are shared.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MATMUL = ("aten::mm", "aten::addmm", "aten::bmm", "aten::_scaled_dot_product_flash_attention_for_cpu",
          "aten::_scaled_dot_product_flash_attention_for_cpu_backward", "aten::baddbmm")
ELEMENTWISE = ("add", "add_", "mul", "mul_", "sub", "div", "neg", "silu", "silu_backward", "pow", "rsqrt", "mean",
               "exp", "sigmoid", "gelu", "gelu_backward", "addcmul_", "addcdiv_", "lerp_", "sqrt", "copy_", "cat",
               "sum", "where", "masked_fill", "fill_", "zero_", "clamp", "_foreach_mul_", "_foreach_add_",
               "_foreach_addcmul_", "_foreach_addcdiv_", "_foreach_lerp_", "_foreach_sqrt", "_foreach_div_",
               "_foreach_mul", "_foreach_norm", "cos", "sin", "_log_softmax", "_log_softmax_backward_data",
               "nll_loss_forward", "nll_loss_backward", "embedding_dense_backward", "index_select", "cumsum")


def setup(model_ref: str, recipe: str, steps: int):
    from lmm_ray import config, optim, stream, train, trial

    cfg = config.load_sweep(str(ROOT / "sweeps" / "quickstart.yaml"), [f"model={model_ref}"])
    spec = trial.trial_spec(cfg, {"recipe": recipe, "lr": 5e-4})
    loaded, model, _ = train.prepare(spec)
    pool = train.stage_inputs(spec, 0, loaded.processor)
    batches = list(stream.stage_loader(pool, pad_id=loaded.tokenizer.pad_token_id, steps=steps,
                                       batch_size=spec.train.batch_size, seed=0, stage=1))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=5e-4, weight_decay=0.01)
    model.train()
    del optim
    return model, opt, params, batches


def run_steps(model, opt, params, batches) -> float:
    t0 = time.perf_counter()
    for b in batches:
        loss = model(**b).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return (time.perf_counter() - t0) / len(batches)


def timed(model, opt, params, batches, threads: int, repeats: int = 3) -> float:
    torch.set_num_threads(threads)
    run_steps(model, opt, params, batches[:2])  # warm-up
    return statistics.median(run_steps(model, opt, params, batches) for _ in range(repeats))


def breakdown(model, opt, params, batches) -> dict:
    from torch.profiler import ProfilerActivity, profile

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run_steps(model, opt, params, batches)
    wall = time.perf_counter() - t0
    cats = {"matmul": 0.0, "elementwise": 0.0, "other aten": 0.0}
    for e in prof.key_averages():
        if not e.key.startswith("aten::"):
            continue
        name = e.key[len("aten::"):]
        cat = "matmul" if e.key in MATMUL else "elementwise" if name in ELEMENTWISE else "other aten"
        cats[cat] += e.self_cpu_time_total / 1e6
    cats["python / dispatcher / autograd"] = wall - sum(cats.values())
    return {k: v / wall for k, v in cats.items()} | {"wall_per_step_profiled": wall / len(batches)}


def position_ids(model, b):
    pos, _ = model.model.get_rope_index(b["input_ids"], mm_token_type_ids=b["mm_token_type_ids"],
                                        image_grid_thw=b["image_grid_thw"], attention_mask=b["attention_mask"])
    return pos


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="base:qwen2_5_vl@quickstart")
    ap.add_argument("--recipe", default="sa_proj")
    ap.add_argument("--steps", type=int, default=20)
    a = ap.parse_args()
    print(f"load average at start {os.getloadavg()}")
    model, opt, params, batches = setup(a.model, a.recipe, a.steps)
    for threads in (1, 2):
        print(f"threads {threads}: {timed(model, opt, params, batches, threads) * 1000:.1f} ms/step")
    for k, v in breakdown(model, opt, params, batches).items():
        print(f"  {k:<32} {v * 1000:.1f} ms" if k.startswith("wall") else f"  {k:<32} {100 * v:.1f} %")

    torch.set_num_threads(1)
    with torch.no_grad():
        t0 = time.perf_counter()
        pos = [position_ids(model, b) for b in batches]
        rope_ms = (time.perf_counter() - t0) / len(batches) * 1000
        t0 = time.perf_counter()
        for b in batches:
            model.model.visual(b["pixel_values"], grid_thw=b["image_grid_thw"])
        vis_ms = (time.perf_counter() - t0) / len(batches) * 1000
    with_pos = [{**b, "position_ids": p} for b, p in zip(batches, pos)]
    base_ms, pre_ms = [], []
    for _ in range(3):  # alternate, so that load from other processes spreads over both
        base_ms.append(timed(model, opt, params, batches, 1, repeats=1) * 1000)
        pre_ms.append(timed(model, opt, params, with_pos, 1, repeats=1) * 1000)
    b, p = statistics.median(base_ms), statistics.median(pre_ms)
    print(f"get_rope_index: {rope_ms:.1f} ms per batch; step {b:.1f} ms -> {p:.1f} ms with position ids "
          f"precomputed ({100 * (p - b) / b:+.1f} %)")
    print(f"vision tower forward: {vis_ms:.1f} ms per batch of {len(batches[0]['image_grid_thw'])} images (no grad)")
    print(f"load average at end {os.getloadavg()}")


if __name__ == "__main__":
    main()
