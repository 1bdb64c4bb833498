"""lmm_ray.memory: exact weight/gradient/optimizer bytes, activations against what autograd keeps,
and the 7B verdicts the study's plans depend on.

How activations are measured on the CPU: `torch.autograd.graph.saved_tensors_hooks` sees every
tensor autograd keeps for backward during one forward; the test sums their storages once each
(several ops save the same tensor, views share a storage) and leaves out the parameters' storages
(weights are counted as weights). That is exactly what stays alive from forward to backward, the
activation memory the estimate models. tracemalloc cannot see torch's allocator, and the CPU has no
`torch.cuda.max_memory_allocated`, so a peak cannot be read directly.
"""

from __future__ import annotations

import json

import pytest
import torch

from lmm_ray import cli, memory

TINY = "tiny:qwen2_5_vl"
QWEN7B = "Qwen/Qwen2.5-VL-7B-Instruct"  # the shipped offline configuration
GPU_GIB = 80


def _tiny_recipe(tiny_copy, family, recipe, dtype):
    from lmm_ray import parallel, recipes

    t = tiny_copy(family)
    t.model.to(dtype)
    model, _ = recipes.apply(t.model, t.family, recipe)
    parallel.upcast_trainable_(model)
    return t, model


def _batch(t, n=2):
    from lmm_ray import data, skills

    return data.collate(data.encode_train(t.processor, skills.generate("count", n, seed=0)), t.tokenizer.pad_token_id)


def _bytes(ts) -> int:
    return sum(x.numel() * x.element_size() for x in ts)


@pytest.mark.parametrize("recipe", ["sa_proj", "mlp_gate_up", "full", "lora"])
def test_weights_grads_optimizer_exact(tiny_copy, recipe):
    """bf16-loaded weights, fp32 trainable masters, one real AdamW step: the tensors, counted."""
    t, model = _tiny_recipe(tiny_copy, "qwen2_5_vl", recipe, torch.bfloat16)
    batch = _batch(t)
    batch["pixel_values"] = batch["pixel_values"].to(torch.bfloat16)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(**batch).loss
    loss.backward()
    opt.step()
    measured = {
        "frozen_weights": _bytes(p for p in model.parameters() if not p.requires_grad),
        "trainable_weights": _bytes(trainable),
        "gradients": _bytes(p.grad for p in trainable),
        "optimizer": _bytes(v for s in opt.state.values() for v in s.values() if torch.is_tensor(v)),
    }
    est = memory.estimate(TINY, recipe, weight_dtype="bf16")
    assert {k: est["parts"][k] for k in measured} == measured
    assert est["params"]["trainable"] == sum(p.numel() for p in trainable)


def _saved_bytes(model, batch) -> int:
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(x):
        st = x.untyped_storage()
        if st.data_ptr() not in params:
            seen.setdefault(st.data_ptr(), st.nbytes())
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        out = model(**batch)
    assert out.loss.requires_grad
    return sum(seen.values())


@pytest.mark.parametrize("family,recipe", [
    ("qwen2_5_vl", "full"), ("qwen2_5_vl", "sa_proj"), ("qwen2_5_vl", "mlp_gate_up"), ("qwen2_5_vl", "lora"),
    ("qwen2_5_vl", "vision"), ("llava", "mlp"), ("llava", "full"),
])
def test_activations_within_30_percent(tiny_copy, family, recipe):
    t, model = _tiny_recipe(tiny_copy, family, recipe, torch.float32)
    batch = _batch(t)
    image_id = model.config.image_token_id if hasattr(model.config, "image_token_id") else model.config.image_token_index
    b, seq = batch["input_ids"].shape
    image_tokens = int((batch["input_ids"] == image_id).sum()) // b
    measured = _saved_bytes(model, batch)
    est = memory.estimate(f"tiny:{family}", recipe, batch=b, seq_len=seq, image_tokens=image_tokens,
                          weight_dtype="fp32", compute_dtype="fp32", device="cpu")
    ratio = est["parts"]["activations"] / measured
    assert 0.7 <= ratio <= 1.3, f"{family}/{recipe}: estimate {est['parts']['activations']} vs measured {measured}"


def test_gradient_checkpointing_keeps_layer_inputs():
    plain = memory.estimate(QWEN7B, "sa_proj", batch=2, seq_len=2048)
    ckpt = memory.estimate(QWEN7B, "sa_proj", batch=2, seq_len=2048, grad_ckpt=True)
    spared = plain["parts"]["activations"] - ckpt["parts"]["activations"]
    assert spared > 0.8 * plain["parts"]["activations"]  # 28 layers' saved sets -> their inputs + one set
    assert ckpt["parts"]["activations"] > 28 * 2 * 2048 * 3584 * 2  # at least every layer's bf16 input


def test_fsdp_shards_weights_grads_and_optimizer():
    ddp = memory.estimate(QWEN7B, "full", workers=8, strategy="ddp")
    fsdp = memory.estimate(QWEN7B, "full", workers=8, strategy="fsdp")
    for k in ("trainable_weights", "gradients"):
        assert ddp["parts"][k] / 8 <= fsdp["parts"][k] < ddp["parts"][k] / 8 * 1.001  # + dim-0 padding
    assert fsdp["parts"]["fsdp_gathered"] > 0 and fsdp["parts"]["ddp_buckets"] == 0
    assert ddp["parts"]["ddp_buckets"] == ddp["parts"]["gradients"]
    # One worker: no all-reduce, so no bucket copy.
    assert memory.estimate(QWEN7B, "sa_proj", workers=1)["parts"]["ddp_buckets"] == 0


# The study's sequence shape: ~1-2k tokens per sample (an image of a few hundred to ~1000 tokens
# plus the question and answer), micro-batch 1-4 per GPU; bf16 weights, bf16 compute, one 80 GB GPU.
@pytest.mark.parametrize("recipe", ["full", "llm"])
def test_7b_whole_model_does_not_fit_one_gpu_under_ddp(recipe):
    for ckpt in (False, True):  # even the lightest shape, even with gradient checkpointing
        est = memory.estimate(QWEN7B, recipe, workers=1, strategy="ddp", batch=1, seq_len=1024, grad_ckpt=ckpt)
        assert not memory.fits(est, GPU_GIB), est["per_gpu_gib"]
    tips = memory.suggest(est, GPU_GIB)
    assert any(s.startswith("fsdp over 8 workers") and "still over" not in s for s in tips)


def test_7b_sa_proj_fits_one_gpu_under_ddp():
    for batch in (1, 2):
        assert memory.fits(memory.estimate(QWEN7B, "sa_proj", batch=batch, seq_len=2048), GPU_GIB)
    # Micro-batch 4 x 2k tokens needs gradient checkpointing (~76 GiB of 80 without).
    assert memory.fits(memory.estimate(QWEN7B, "sa_proj", batch=4, seq_len=2048, grad_ckpt=True), GPU_GIB)
    assert memory.suggest(memory.estimate(QWEN7B, "sa_proj", batch=1, seq_len=2048), GPU_GIB) == []


def test_7b_full_fits_8_gpus_under_fsdp():
    assert memory.fits(memory.estimate(QWEN7B, "full", workers=8, strategy="fsdp", batch=1, seq_len=2048), GPU_GIB)
    assert memory.fits(memory.estimate(QWEN7B, "full", workers=8, strategy="fsdp", batch=4, seq_len=2048,
                                       grad_ckpt=True), GPU_GIB)


def test_main_json_and_table(capsys):
    assert cli.main(["memory", TINY, "--recipe", "sa_proj", "--workers", "2", "--strategy", "fsdp", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["per_gpu_gib"] > 0 and set(memory.PART_ORDER) <= set(out["parts"])
    assert out["inputs"]["strategy"] == "fsdp" and out["inputs"]["workers"] == 2
    assert cli.main(["memory", QWEN7B, "--recipe", "full", "--batch", "1", "--seq-len", "1024", "--budget-gib", "80"]) == 0
    table = capsys.readouterr().out
    assert "per_gpu_gib" in table and "does NOT fit" in table and "fsdp over 8 workers" in table
    assert cli.main(["memory", TINY, "--recipe", "nope"]) == 2
    assert "unknown recipe" in capsys.readouterr().err
