"""Training throughput and peak memory per recipe on a GPU, for a Qwen2.5-VL-3B-sized model.

Random weights (throughput does not depend on them); synthetic batches shaped like a real
sample: one 448x448 image (1024 patches -> 256 image tokens) and ~256 text tokens. The step is
the project's own `optim.train_stage` (AdamW, warm-up/cosine, clipping, bf16 autocast) on a model
whose parameters are frozen/unfrozen by `recipes.apply`, so this measures the loop trials run.

    python benchmarks/gpu_train_throughput.py [--recipes sa_proj,llm,...] [--batch 4] [--steps 10]

FLOPs per step are counted per recipe rather than with the usual 6*N*T: forward 2*N*T, the
backward pass through activations 2*N*T (needed whenever anything below the output is trained),
and weight gradients 2*N_trainable*T. MFU = counted FLOPs / time / peak bf16 dense rate.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from lmm_ray import families, recipes
from lmm_ray.optim import train_stage

PEAK_BF16 = {"H100": 989e12, "H200": 989e12}  # dense bf16 tensor-core peak (SXM)


def config_3b() -> Qwen2_5_VLConfig:
    """Qwen2.5-VL-3B-Instruct's architecture (hidden 2048, 36 layers, ViT 32 x 1280)."""
    return Qwen2_5_VLConfig(
        text_config=dict(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                         num_attention_heads=16, num_key_value_heads=2, max_position_embeddings=128000,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
                         tie_word_embeddings=True),
        vision_config=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2, window_size=112, out_hidden_size=2048,
                           fullatt_block_indexes=[7, 15, 23, 31], in_chans=3),
        image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653,
        tie_word_embeddings=True,
    )


def sample(cfg, text_tokens: int, grid: int = 32) -> dict:
    n_img = grid * grid // 4
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 150000, (1, text_tokens + n_img + 2), generator=g)
    ids[0, 10] = cfg.vision_start_token_id
    ids[0, 11 : 11 + n_img] = cfg.image_token_id
    ids[0, 11 + n_img] = cfg.vision_end_token_id
    labels = ids.clone()
    labels[0, : 12 + n_img] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
            "mm_token_type_ids": (ids == cfg.image_token_id).long(),
            "pixel_values": torch.randn(grid * grid, 3 * 2 * 14 * 14, generator=g),
            "image_grid_thw": torch.tensor([[1, grid, grid]])}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--recipes", default="sa_proj,sa_qkv,mlp_gate_up,mlp,llm,lora,projector,vision,full")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--text-tokens", type=int, default=256)
    ap.add_argument("--grad-ckpt", action="store_true")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    a = ap.parse_args()
    assert torch.cuda.is_available(), "this benchmark needs a GPU"
    dev = torch.device("cuda")
    name = torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
    fam = families.get_family("qwen2_5_vl")
    cfg = config_3b()
    encs = [sample(cfg, a.text_tokens) for _ in range(8)]
    tokens = a.batch * encs[0]["input_ids"].shape[1]
    rows = []
    for rname in a.recipes.split(","):
        torch.cuda.empty_cache()
        torch.manual_seed(0)
        with torch.device(dev):
            model = Qwen2_5_VLForConditionalGeneration(cfg)
        if a.grad_ckpt:
            model.gradient_checkpointing_enable()
        model, res = recipes.apply(model, fam, rname)
        n_total = sum(p.numel() for p in model.parameters())
        torch.cuda.reset_peak_memory_stats()
        try:
            kw = dict(lr=1e-5, batch_size=a.batch, pad_id=0, seed=0, precision="bf16")
            train_stage(model, encs, steps=2, stage=0, **kw)  # warm-up: kernels, allocator, AdamW state
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            train_stage(model, encs, steps=a.steps, stage=1, **kw)
            torch.cuda.synchronize()
            dt = (time.perf_counter() - t0) / a.steps
            flops = (4 * n_total + 2 * res.trainable) * tokens
            row = {"recipe": rname, "trainable": res.trainable, "total": n_total, "step_s": round(dt, 4),
                   "tokens_per_s": round(tokens / dt), "tflops": round(flops / dt / 1e12, 1),
                   "mfu": round(flops / dt / peak, 3) if peak else None,
                   "mfu_6NT": round(6 * n_total * tokens / dt / peak, 3) if peak else None,
                   "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 1)}
        except torch.OutOfMemoryError:
            row = {"recipe": rname, "trainable": res.trainable, "total": n_total, "error": "out of memory"}
        print(json.dumps(row), flush=True)
        rows.append(row)
        del model
    meta = {"device": name, "torch": torch.__version__, "batch": a.batch, "tokens_per_step": tokens, "grad_ckpt": a.grad_ckpt}
    print(json.dumps(meta))
    with open(os.path.join(a.out, f"gpu_train_throughput{'_gc' if a.grad_ckpt else ''}.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
