"""Per-GPU memory of a training run, estimated from the model's configuration (no weights loaded).

`estimate(model_ref, recipe, workers=, strategy=, batch=, seq_len=, grad_ckpt=, weight_dtype=)`
builds the model on the meta device (`models.model_config` + `models.meta_model`: hub ids through the
shipped offline configurations, local folders, tiny:/base:), resolves the recipe on it and adds up,
in bytes per GPU:

- `frozen_weights`: frozen parameters in `weight_dtype` (as loaded; never updated, so kept low).
- `trainable_weights`: trainable parameters (LoRA adapters included) as fp32 master weights, the
  policy of `parallel.shard_model` / `parallel.upcast_trainable_`: an AdamW step (~lr x weight) is
  below bf16's resolution, so bf16 masters would not move.
- `gradients`: one fp32 gradient per trainable parameter.
- `optimizer`: AdamW's exp_avg and exp_avg_sq, fp32 like their parameters, plus its 4-byte `step`
  per tensor.
- `ddp_buckets` (DDP, >1 worker): DDP keeps its own flat fp32 copy of the gradients for the
  all-reduce (`gradient_as_bucket_view=False`, the default, which Ray's `prepare_model` keeps).
- `autocast_copies` (DDP, bf16 compute): autocast caches a bf16 copy of each trainable weight
  for the length of the forward; and when frozen weights are wider than the compute dtype (fp32
  loading), the bf16 copy of each frozen weight on the gradient path (decoder layers from the
  first trained one, the head), which its Linear keeps to pass the gradient back.
- `fsdp_gathered` (FSDP): weights FSDP holds unsharded at the peak, in the compute dtype: the root
  group (everything outside the blocks: embeddings, head, projector), which stays gathered from
  forward to backward, plus two blocks (the running one and the one prefetched), plus one block's
  unsharded gradients (compute dtype, then fp32 for the reduce-scatter).
- `activations`: tensors saved for backward (formula in `_llm_layer`, `_vision_block`), including
  the loss's fp32 log-probabilities.
- `loss_peak`: transient around the loss: the logits in the compute dtype and their fp32 copy
  (and in backward their gradient) next to the saved log-probabilities.
- `runtime`: CUDA context, NCCL buffers and allocator slack, a fixed RUNTIME_GIB (not derived).

Under FSDP over `workers` GPUs the weights, gradients and optimizer states are sharded: each GPU
holds ceil(dim0 / workers) rows of every parameter (FSDP2 pads dim 0 to a multiple of the world
size), so they are exact per-rank bytes, not only total / workers. Parameter, gradient and
optimizer bytes are exact (tests count the tensors after a real AdamW step); activations are a
model of what autograd keeps (tests: within 30% of the saved tensors measured on the tiny model).
Buffers (rotary frequencies) are left out.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import torch

GIB = 2**30
RUNTIME_GIB = 1.5  # CUDA context (~0.5 GiB) + NCCL communicators and buffers + allocator fragmentation
FIT_MARGIN = 0.95  # share of the GPU's memory a plan may use: the caching allocator fragments
_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
           "fp32": torch.float32, "float32": torch.float32}
PART_ORDER = ("frozen_weights", "trainable_weights", "gradients", "optimizer", "ddp_buckets", "autocast_copies",
              "fsdp_gathered", "activations", "loss_peak", "runtime")
LLM_ROLES_IN_LAYER = ("llm.attn.q", "llm.attn.k", "llm.attn.v", "llm.attn.o", "llm.mlp.gate", "llm.mlp.up",
                      "llm.mlp.down", "llm.norm")


def as_dtype(d: torch.dtype | str) -> torch.dtype:
    if isinstance(d, torch.dtype):
        return d
    if d not in _DTYPES:
        raise ValueError(f"unknown dtype {d!r}; use one of {', '.join(_DTYPES)}")
    return _DTYPES[d]


def _nbytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


@dataclass
class _Tensor:
    """One parameter as the estimate sees it: shape, whether it trains, which block it sits in."""

    name: str
    shape: tuple[int, ...]
    trainable: bool
    block: str | None  # "model.language_model.layers.3" or None for the FSDP root group
    role: str
    layer: int | None  # LLM decoder layer index

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def shard_numel(self, workers: int) -> int:
        """Elements one rank keeps under FSDP2: ceil(dim0 / workers) rows (dim 0 is padded)."""
        if workers == 1 or not self.shape:
            return self.numel
        return math.ceil(self.shape[0] / workers) * (self.numel // self.shape[0])


def _load_meta(model_ref: str):
    from lmm_ray import models

    try:
        family, config = models.model_config(model_ref, offline=True)
    except ValueError:  # not shipped and not a folder: ask the hub
        family, config = models.model_config(model_ref)
    return family, config, models.meta_model(family, config)


def _tensors(meta, family, resolved) -> list[_Tensor]:
    from lmm_ray.recipes import classify

    blocks = [re.compile(re.escape(p) + r"\.(\d+)\.") for p in family.blocks]
    params = dict(meta.named_parameters())

    def block_of(name: str) -> str | None:
        for b in blocks:
            m = b.match(name)
            if m:
                return m.group(0)[:-1]
        return None

    trainable = set(resolved.names)
    out = []
    for n, p in params.items():
        role, layer = classify(family, n)
        out.append(_Tensor(n, tuple(p.shape), n in trainable, block_of(n), role, layer))
    lo = resolved.recipe.lora
    for t in resolved.lora_targets:  # peft adds A (rank x in) and B (out x rank) next to each target
        out_f, in_f = params[t + ".weight"].shape
        role, layer = classify(family, t + ".weight")
        for suffix, shape in ((".lora_A.default.weight", (lo.rank, in_f)), (".lora_B.default.weight", (out_f, lo.rank))):
            out.append(_Tensor(t + suffix, shape, True, block_of(t + ".weight"), role, layer))
    return out


# ---------------------------------------------------------------------------------------------
# Activations: what autograd saves for backward, per token (bytes)


# A decoder layer's parts in forward order. A part's weight gradient needs its input; passing the
# gradient *through* a part (to something trained earlier) needs what its backward reads.
_NORM_KEYS = {"input_layernorm": "norm.in", "post_attention_layernorm": "norm.post"}


def _layer_key(t: "_Tensor") -> str:
    if t.role == "llm.norm":
        return next((k for part, k in _NORM_KEYS.items() if part in t.name), "norm.final")
    return t.role


def _llm_layer(text, e: int, on: bool, trains: set[str], lora: dict[str, tuple[int, float]],
               mask_bytes: int = 1) -> tuple[float, bool]:
    """(bytes a Qwen2/Llama decoder layer saves per token, whether the gradient path runs on after it).

    `on`: something before this layer trains, so the gradient must pass through the whole layer.
    Walking the layer in forward order, a part saves:
    - RMSNorm: to pass the gradient through, its input upcast to fp32 and its fp32 rsqrt (4h + 4);
      if its weight trains, its normalised output (h).
    - q/k/v, gate/up, down projections: their input (h, h, intermediate) if their weight trains (a
      Linear keeps its input only for its weight's gradient); o_proj's input is a view of the
      attention output, so it costs nothing once attention is on the path.
    - attention, once on the path: q and k after RoPE, v (k, v with the kv heads), the output, and
      the fp32 log-sum-exp per head (SDPA's flash / memory-efficient kernels; no attention matrix).
    - gated MLP core, once on the path: gate output (SiLU input), SiLU output, up output (3 x intermediate).
    - LoRA target: its dropout output and dropout mask (input size; `mask_bytes` 1 on CUDA, where the
      mask is bool; the CPU keeps it in the input dtype; with dropout 0, the shared input, as if the
      base weight trained) and the rank-sized A output.
    Sizes are x `e` bytes (compute dtype) unless fp32 is said. Parts before the first trained one
    save nothing: no gradient flows there.
    """
    h, i, a = text.hidden_size, text.intermediate_size, text.num_attention_heads
    d = getattr(text, "head_dim", None) or h // a
    kv = text.num_key_value_heads
    lora_in = {"llm.attn.q": h, "llm.attn.k": h, "llm.attn.v": h, "llm.attn.o": a * d, "llm.mlp.gate": h,
               "llm.mlp.up": h, "llm.mlp.down": i}
    saved = 0.0
    need = set(trains)  # parts whose input must be kept
    for role, (rank, dropout) in lora.items():
        saved += rank * e
        if dropout > 0:
            saved += lora_in[role] * (e + mask_bytes)
        else:
            need.add(role)
    trained = set(trains) | set(lora)

    def norm(key: str) -> float:
        return (4 * h + 4 if on else 0) + (h * e if key in trained else 0)

    saved += norm("norm.in")
    on = on or "norm.in" in trained
    qkv = {"llm.attn.q", "llm.attn.k", "llm.attn.v"}
    if need & qkv:
        saved += h * e
    on = on or bool(trained & qkv)
    if on:
        saved += (2 * a * d + 2 * kv * d) * e + 4 * a
    elif "llm.attn.o" in need:
        saved += a * d * e
    on = on or "llm.attn.o" in trained
    saved += norm("norm.post")
    on = on or "norm.post" in trained
    if need & {"llm.mlp.gate", "llm.mlp.up"}:
        saved += h * e
    on = on or bool(trained & {"llm.mlp.gate", "llm.mlp.up"})
    if on:
        saved += 3 * i * e
    if "llm.mlp.down" in need:
        saved += i * e
    return saved, on or "llm.mlp.down" in trained


def _side(p) -> int:
    return p[0] if isinstance(p, (list, tuple)) else int(p)


def _vision_dims(config, family) -> tuple[int, int, int, int, bool, int]:
    """(hidden, intermediate, heads, blocks, gated MLP + RMSNorm?, patches per LLM image token)."""
    v = config.vision_config
    heads = getattr(v, "num_heads", None) or v.num_attention_heads
    layers = getattr(v, "depth", None) or v.num_hidden_layers
    if family.name == "qwen2_5_vl":
        return v.hidden_size, v.intermediate_size, heads, layers, True, v.spatial_merge_size**2
    merge = round(1 / config.downsample_ratio) ** 2 if getattr(config, "downsample_ratio", None) else 1
    return v.hidden_size, v.intermediate_size, heads, layers, False, merge


def _vision_block(hv: int, iv: int, heads: int, gated: bool, e: int) -> float:
    """Bytes a trained ViT block saves per patch (vision recipes train whole blocks): both norms'
    inputs (fp32) and statistics, and for Qwen's RMSNorm the normalised output; the qkv input; q, k,
    v and the output, with the fp32 log-sum-exp; the proj input; the MLP, gated (Qwen: gate/up input,
    gate and up outputs, SiLU output, down input) or plain (fc1 input, GELU input, fc2 input)."""
    norms = 2 * (4 * hv + 4 + (hv * e if gated else 4))
    attn = hv * e + 4 * hv * e + 4 * heads + hv * e
    mlp = (hv + 4 * iv) * e if gated else (hv + 2 * iv) * e
    return norms + attn + mlp


def _activations(config, family, tensors: list[_Tensor], resolved, *, tokens: int, image_tokens: int,
                 e: int, grad_ckpt: bool, mask_bytes: int) -> tuple[float, float, set[int]]:
    """(saved for backward, loss transient, LLM layers on the gradient path) in bytes, for `tokens`
    tokens of which `image_tokens` are image tokens."""
    text = config.get_text_config()
    h, vocab, n_layers = text.hidden_size, text.vocab_size, text.num_hidden_layers
    trains = [t for t in tensors if t.trainable]
    keys_by_layer: dict[int, set[str]] = {}
    lora_by_layer: dict[int, dict[str, tuple[int, float]]] = {}
    for t in trains:
        if t.layer is None:
            continue
        if ".lora_A." in t.name:
            lora_by_layer.setdefault(t.layer, {})[t.role] = (resolved.recipe.lora.rank, resolved.recipe.lora.dropout)
        elif ".lora_" not in t.name:
            keys_by_layer.setdefault(t.layer, set()).add(_layer_key(t))
    # Something before the decoder trains: the gradient runs through every layer.
    on = any(t.role in {"vision", "projector", "llm.embed", "other"} for t in trains)
    hv, iv, vheads, vlayers, gated, merge = _vision_dims(config, family)
    patches = image_tokens * merge
    saved = 0.0
    layer_sizes = []
    path: set[int] = set()
    for layer in range(n_layers):
        size, after = _llm_layer(text, e, on, keys_by_layer.get(layer, set()), lora_by_layer.get(layer, {}), mask_bytes)
        if size:
            layer_sizes.append(size * tokens)
            path.add(layer)
        on = after
    vision = [t for t in trains if t.role == "vision"]
    vision_train = bool(vision)
    # From the first trained vision block on (every block when the patch embedding trains).
    first_block = min((int(t.block.rsplit(".", 1)[1]) if t.block else 0 for t in vision), default=vlayers)
    vision_sizes = [_vision_block(hv, iv, vheads, gated, e) * patches] * (vlayers - first_block)
    if grad_ckpt:
        # HF checkpoints every decoder layer and vision block: each keeps only its input; backward
        # recomputes one block at a time, holding that block's full saved set.
        saved += len(layer_sizes) * tokens * h * e + len(vision_sizes) * patches * hv * e
        saved += max([*layer_sizes, *vision_sizes], default=0)
    else:
        saved += sum(layer_sizes) + sum(vision_sizes)
    if layer_sizes:
        d = getattr(text, "head_dim", None) or h // text.num_attention_heads
        saved += 2 * tokens * d * e  # RoPE cos and sin, shared by the layers
    if vision_sizes:
        vd = hv // vheads
        saved += 2 * patches * vd * e  # the ViT's RoPE cos and sin (Qwen; a stand-in for position ids elsewhere)
    if any(t.role == "vision" and t.block is None for t in trains):
        v = config.vision_config
        if gated:  # Qwen: a 3D patch of temporal_patch_size frames
            patch_in = v.in_channels * v.temporal_patch_size * v.patch_size**2
        else:
            patch_in = 3 * _side(v.patch_size) ** 2
        saved += patches * patch_in * e  # pixels, the patch embedding's input
    if any(t.role == "projector" for t in trains) or vision_train:
        if gated:  # Qwen's merger: RMSNorm over patches, then Linear-GELU-Linear on merge x hv
            saved += patches * (4 * hv + 4 + hv * e) + image_tokens * 3 * merge * hv * e
        else:  # LLaVA-style Linear-GELU-Linear (InternVL: after a merge-fold pixel shuffle and LayerNorm)
            saved += image_tokens * (2 * merge * hv + 2 * h) * e
    roles = {t.role for t in trains}
    final_norm = any(_layer_key(t) == "norm.final" for t in trains)
    saved += tokens * ((4 * h + 4 if on else 0) + (h * e if final_norm else 0))  # final norm
    if "llm.head" in roles:
        saved += tokens * h * e  # lm_head input
    saved += tokens * vocab * 4  # cross-entropy's fp32 log-probabilities
    loss_peak = tokens * vocab * (e + 4)  # logits, and their fp32 copy (then gradient) beside the log-probs
    return saved, loss_peak, path


# ---------------------------------------------------------------------------------------------
# The estimate


def estimate(model_ref: str, recipe, *, workers: int = 1, strategy: str = "ddp", batch: int = 1, seq_len: int = 1024,
             grad_ckpt: bool = False, weight_dtype: torch.dtype | str = "bf16", compute_dtype: torch.dtype | str = "bf16",
             image_tokens: int | None = None, custom: dict | None = None, device: str = "cuda") -> dict[str, Any]:
    """Bytes per GPU of training `recipe` on `model_ref` (see the module docstring for each part).

    `batch` is the micro-batch per GPU and `seq_len` its padded length (image tokens included);
    `image_tokens` (default seq_len // 2) of them are image tokens, which sets the vision tower's
    patches when vision weights train. `weight_dtype` is what frozen weights are loaded in;
    `compute_dtype` what activations are (bf16 autocast or FSDP mixed precision; fp32 on the CPU).
    `device="cpu"` models the CPU's dropout, which keeps its mask in the input dtype (CUDA: bool).
    Returns {"inputs": ..., "params": counts, "parts": bytes, "parts_gib": GiB, "per_gpu_gib": total}.
    """
    from lmm_ray import recipes

    if strategy not in ("ddp", "fsdp"):
        raise ValueError(f"strategy must be 'ddp' or 'fsdp', not {strategy!r}")
    if workers < 1 or batch < 1 or seq_len < 1:
        raise ValueError("workers, batch and seq_len must be >= 1")
    wdt, cdt = as_dtype(weight_dtype), as_dtype(compute_dtype)
    wb, e = _nbytes(wdt), _nbytes(cdt)
    image_tokens = seq_len // 2 if image_tokens is None else image_tokens
    family, config, meta = _load_meta(model_ref)
    resolved = recipes.resolve(meta, family, recipe, custom)
    tensors = _tensors(meta, family, resolved)
    fsdp = strategy == "fsdp"
    shard = workers if fsdp else 1

    def numel(ts, sharded=True):
        return sum(t.shard_numel(shard) if sharded else t.numel for t in ts)

    frozen = [t for t in tensors if not t.trainable]
    train = [t for t in tensors if t.trainable]
    n_train = numel(train)
    parts = {
        "frozen_weights": numel(frozen) * wb,
        "trainable_weights": n_train * 4,
        "gradients": n_train * 4,
        "optimizer": n_train * 8 + 4 * len(train),
        "ddp_buckets": 0,
        "autocast_copies": 0,
        "fsdp_gathered": 0,
    }
    if not fsdp:
        if workers > 1:
            parts["ddp_buckets"] = n_train * 4
        if e < 4:
            parts["autocast_copies"] = n_train * e
    else:
        by_block: dict[str | None, list[_Tensor]] = {}
        for t in tensors:
            by_block.setdefault(t.block, []).append(t)
        root = numel(by_block.pop(None, []), sharded=False)
        sizes = sorted((numel(ts, sharded=False) for ts in by_block.values()), reverse=True)
        grads = max((numel([t for t in ts if t.trainable], sharded=False) for ts in by_block.values()), default=0)
        parts["fsdp_gathered"] = (root + sum(sizes[:2])) * e + grads * (e + 4)
    tokens = batch * seq_len
    act, loss_peak, path = _activations(config, family, tensors, resolved, tokens=tokens, image_tokens=batch * image_tokens,
                                  e=e, grad_ckpt=grad_ckpt, mask_bytes=1 if device == "cuda" else e)
    if not fsdp and wb > e:
        parts["autocast_copies"] += e * sum(t.numel for t in frozen if t.layer in path or t.role == "llm.head")
    parts["activations"] = int(act)
    parts["loss_peak"] = int(loss_peak)
    parts["runtime"] = int(RUNTIME_GIB * GIB)
    total = sum(parts.values())
    return {
        "inputs": {"model": model_ref, "recipe": resolved.recipe.name, "workers": workers, "strategy": strategy,
                   "batch": batch, "seq_len": seq_len, "image_tokens": image_tokens, "grad_ckpt": grad_ckpt,
                   "weight_dtype": str(wdt).replace("torch.", ""), "compute_dtype": str(cdt).replace("torch.", ""),
                   "family": family.name},
        "params": {"total": sum(t.numel for t in tensors), "trainable": sum(t.numel for t in train),
                   "frozen": sum(t.numel for t in frozen)},
        "parts": parts,
        "parts_gib": {k: v / GIB for k, v in parts.items()},
        "per_gpu_gib": total / GIB,
    }


def fits(est: dict, budget_gib: float, margin: float = FIT_MARGIN) -> bool:
    """Whether the estimate fits a GPU of `budget_gib`, keeping (1 - margin) for fragmentation."""
    return est["per_gpu_gib"] <= margin * budget_gib


def suggest(est: dict, budget_gib: float, *, max_workers: int = 8) -> list[str]:
    """Ways to fit `budget_gib` (empty if it fits), each with its estimated per-GPU GiB, cheapest change first:
    FSDP on the same workers, gradient checkpointing, FSDP on more workers, a smaller micro-batch."""
    if fits(est, budget_gib):
        return []
    inp = dict(est["inputs"])
    base = {k: inp[k] for k in ("workers", "strategy", "batch", "seq_len", "grad_ckpt", "weight_dtype",
                                "compute_dtype", "image_tokens")}
    tries: list[tuple[str, dict]] = []
    if inp["strategy"] == "ddp" and inp["workers"] > 1:
        tries.append((f"fsdp over the same {inp['workers']} workers", {"strategy": "fsdp"}))
    if not inp["grad_ckpt"]:
        tries.append(("gradient checkpointing", {"grad_ckpt": True}))
    w = max(2, inp["workers"])
    while w <= max_workers:
        if w > inp["workers"] or (inp["strategy"] == "ddp" and inp["workers"] == 1):
            tries.append((f"fsdp over {w} workers", {"strategy": "fsdp", "workers": w}))
        if not inp["grad_ckpt"] and (w > inp["workers"] or inp["strategy"] == "ddp"):
            tries.append((f"fsdp over {w} workers + gradient checkpointing",
                          {"strategy": "fsdp", "workers": w, "grad_ckpt": True}))
        w *= 2
    b = inp["batch"] // 2
    while b >= 1:
        tries.append((f"micro-batch {b} (raise grad_accum to keep the global batch)", {"batch": b}))
        b //= 2
    out = []
    for label, change in tries:
        e2 = estimate(inp["model"], inp["recipe"], **{**base, **change})
        out.append(f"{label}: {e2['per_gpu_gib']:.1f} GiB" + ("" if fits(e2, budget_gib) else " (still over)"))
    return out


def format_table(est: dict, budget_gib: float | None = None) -> str:
    inp, p = est["inputs"], est["params"]
    lines = [
        f"{inp['model']}  recipe {inp['recipe']}  {inp['strategy']} x{inp['workers']}  micro-batch {inp['batch']} x "
        f"{inp['seq_len']} tokens ({inp['image_tokens']} image)  grad_ckpt {'on' if inp['grad_ckpt'] else 'off'}",
        f"weights {inp['weight_dtype']} (trainable fp32 masters), compute {inp['compute_dtype']};  params "
        f"{p['total'] / 1e9:.2f} B, trainable {p['trainable'] / 1e6:.1f} M ({100 * p['trainable'] / p['total']:.1f}%)",
        "",
        f"{'part':<20}{'GiB per GPU':>12}",
    ]
    for k in PART_ORDER:
        v = est["parts_gib"][k]
        if v:
            lines.append(f"{k:<20}{v:>12.2f}")
    lines.append(f"{'per_gpu_gib':<20}{est['per_gpu_gib']:>12.2f}")
    if budget_gib is not None:
        ok = fits(est, budget_gib)
        lines.append(f"\n{'fits' if ok else 'does NOT fit'} a {budget_gib:g} GiB GPU "
                     f"(with {100 * (1 - FIT_MARGIN):.0f}% kept free)")
        lines += [f"  - {s}" for s in suggest(est, budget_gib)]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# A sweep's plan


def sweep_inputs(cfg, strategy: str | None = None) -> dict:
    """estimate() keywords for a trial of `cfg`: its workers and strategy, the micro-batch per GPU
    (batch_size / workers / grad_accum), `resources.estimate_seq_len`, its dtypes and checkpointing."""
    r, t = cfg.resources, cfg.train
    gpu = r.gpus_per_worker > 0
    auto = "bf16" if gpu else "fp32"
    return dict(workers=r.num_workers, strategy=strategy or ("ddp" if r.strategy == "auto" else r.strategy),
                batch=max(1, t.batch_size // (r.num_workers * t.grad_accum)), seq_len=r.estimate_seq_len,
                grad_ckpt=t.gradient_checkpointing,
                weight_dtype=auto if t.weight_dtype == "auto" else t.weight_dtype,
                compute_dtype=auto if t.precision == "auto" else t.precision, device="cuda" if gpu else "cpu")


def budget_gib(cfg) -> float | None:
    """The per-GPU memory a trial may use: resources.gpu_memory_gb, else this machine's first GPU
    (the cluster's GPUs are probed after connecting: cluster.gpu_memory_gib); None on CPU trials."""
    if not cfg.resources.gpus_per_worker:
        return None
    if cfg.resources.gpu_memory_gb is not None:
        return float(cfg.resources.gpu_memory_gb)
    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(0).total_memory / GIB
    return None


def pick_strategy(cfg, recipe: str, budget: float | None = None) -> str:
    """`resources.strategy: auto`: DDP when the recipe fits one GPU replicated (less communication),
    else FSDP. Without a known budget, FSDP: it is never the one that runs out of memory."""
    budget = budget if budget is not None else budget_gib(cfg)
    if budget is None:
        return "fsdp"
    est = estimate(cfg.model, recipe, custom=cfg.search_space.custom_recipes(), **sweep_inputs(cfg, "ddp"))
    return "ddp" if fits(est, budget) else "fsdp"
