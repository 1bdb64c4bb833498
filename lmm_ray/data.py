"""Samples -> model inputs: chat template, image expansion, answer-only labels, padding.

`encode_train_one` / `encode_prompt_one` encode one sample (a dict of tensors with a leading
batch dimension of 1); `collate` pads a list of them into a batch. `encode_train` and
`encode_prompts` encode a list of Samples up front (generated skills, whose images are tiny);
given a `SamplePlan` (references, see skills/loaders.py) they return `LazyEncodings` instead,
which encodes a sample when it is indexed, so a real dataset is never processed whole and
`optim.train_stage` / `evaluate.build_eval_sets` stream it unchanged. `lmm_ray.stream` adds the
DataLoader (worker processes, prefetch) on top.

Each image goes through the processor once. The answer span is found on the text alone: the
processor expands the image placeholder inside the prompt only, so the number of tokens after
the prompt is the same in the text-only tokenization (cheap: no image) and in the processed
sequence.
"""

from __future__ import annotations

from typing import Sequence

import torch

from lmm_ray.skills.loaders import SamplePlan
from lmm_ray.skills.schema import Sample

IGNORE = -100
# Keys that hold one entry per token; everything else the processor returns (pixel values,
# image grids, image sizes) is per image and is concatenated along dim 0.
TOKEN_KEYS = ("input_ids", "attention_mask", "labels", "mm_token_type_ids", "token_type_ids")


def chat(sample: Sample, with_answer: bool) -> list[dict]:
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": sample.question}]}]
    if with_answer:
        msgs.append({"role": "assistant", "content": [{"type": "text", "text": sample.answer}]})
    return msgs


def prompt_text(processor, sample: Sample) -> str:
    return processor.apply_chat_template(chat(sample, False), add_generation_prompt=True, tokenize=False)


def full_text(processor, sample: Sample) -> str:
    return processor.apply_chat_template(chat(sample, True), add_generation_prompt=False, tokenize=False)


def _one(processor, text: str, image) -> dict[str, torch.Tensor]:
    return dict(processor(text=[text], images=[image], return_tensors="pt"))


def answer_length(processor, sample: Sample) -> tuple[str, list[int]]:
    """(full text, the token ids after the prompt), from the tokenizer alone (no image)."""
    prompt, full = prompt_text(processor, sample), full_text(processor, sample)
    if not full.startswith(prompt):
        raise ValueError(f"chat template renders the prompt of sample {sample.id!r} differently with and without the answer")
    tok = processor.tokenizer
    p_ids, f_ids = tok(prompt)["input_ids"], tok(full)["input_ids"]
    if f_ids[: len(p_ids)] != p_ids or len(f_ids) <= len(p_ids):
        raise ValueError(f"the tokens of sample {sample.id!r}'s prompt change when its answer is appended")
    return full, f_ids[len(p_ids):]


def encode_train_one(processor, sample: Sample) -> dict[str, torch.Tensor]:
    """Prompt + answer, with labels on the answer tokens only (prompt and image tokens masked)."""
    full, answer_ids = answer_length(processor, sample)
    enc = _one(processor, full, sample.image)
    ids = enc["input_ids"]
    n_prompt = ids.shape[1] - len(answer_ids)
    if ids[0, n_prompt:].tolist() != answer_ids:
        # The processor tokenized the answer differently from its own tokenizer: the label span
        # would be wrong, so refuse rather than train on prompt tokens.
        raise ValueError(f"the processor's tokens of sample {sample.id!r}'s answer differ from its tokenizer's")
    labels = ids.clone()
    labels[:, :n_prompt] = IGNORE
    enc["labels"] = labels
    return enc


def encode_prompt_one(processor, sample: Sample) -> dict[str, torch.Tensor]:
    """Prompt only (ending with the assistant header), for generation."""
    return _one(processor, prompt_text(processor, sample), sample.image)


class LazyEncodings(torch.utils.data.Dataset):
    """The encodings of a plan's samples, each computed when it is indexed (nothing is kept).

    `enc[i]` is one encoding, `enc[i:j]` a list of them, `len(enc)` the number of samples, so it
    stands in for the list `encode_train` / `encode_prompts` return; `select(idx)` is a view of
    some of them (sharded evaluation). A torch Dataset, so a DataLoader can read it in workers."""

    def __init__(self, plan: SamplePlan, processor, kind: str = "prompt", idx: Sequence[int] | None = None):
        if kind not in ("train", "prompt"):
            raise ValueError(f"LazyEncodings: kind must be 'train' or 'prompt', not {kind!r}")
        self.plan, self.processor, self.kind = plan, processor, kind
        self.idx = list(range(len(plan))) if idx is None else list(idx)

    def __len__(self) -> int:
        return len(self.idx)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        sample = self.plan.sample(self.idx[i])
        return (encode_train_one if self.kind == "train" else encode_prompt_one)(self.processor, sample)

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def select(self, idx: Sequence[int]) -> "LazyEncodings":
        return LazyEncodings(self.plan, self.processor, self.kind, [self.idx[i] for i in idx])


def encode_train(processor, samples: Sequence[Sample] | SamplePlan):
    """Training encodings: a list for Samples, `LazyEncodings` for a SamplePlan."""
    if isinstance(samples, SamplePlan):
        return LazyEncodings(samples, processor, "train")
    return [encode_train_one(processor, s) for s in samples]


def first_answer_token(tokenizer, answer: str) -> int:
    return tokenizer(answer, add_special_tokens=False)["input_ids"][0]


def encode_prompts(processor, samples: Sequence[Sample] | SamplePlan):
    """Prompt encodings: a list for Samples, `LazyEncodings` for a SamplePlan."""
    if isinstance(samples, SamplePlan):
        return LazyEncodings(samples, processor, "prompt")
    return [encode_prompt_one(processor, s) for s in samples]


POSITION_KEY = "position_ids"
_ROPE_INPUTS = ("input_ids", "mm_token_type_ids", "image_grid_thw", "attention_mask")


def add_position_ids(model, encodings: Sequence[dict]) -> None:
    """Store each training encoding's position ids, for models that derive them from the input ids
    and image grids (Qwen2-VL's multimodal RoPE: `get_rope_index`, a Python loop over the batch
    that every forward otherwise repeats for samples a stage draws again and again). Computed on
    one unpadded sample they are the batch's row exactly (get_rope_index gives padding 0, which
    `collate` pads with), so the forward is unchanged bit for bit (tests/test_train.py)."""
    rope = next((m.get_rope_index for m in model.modules() if hasattr(m, "get_rope_index")), None)
    if rope is None:
        return
    with torch.no_grad():
        for e in encodings:
            if all(k in e for k in _ROPE_INPUTS):
                e[POSITION_KEY] = rope(e["input_ids"], mm_token_type_ids=e["mm_token_type_ids"],
                                       image_grid_thw=e["image_grid_thw"], attention_mask=e["attention_mask"])[0]


def _cat_images(key: str, ts: list[torch.Tensor]) -> torch.Tensor:
    if all(t.shape[1:] == ts[0].shape[1:] for t in ts):
        return torch.cat(ts)
    # LLaVA-OneVision: pixel_values [1, P_i, 3, H, W], P_i (base view + anyres crops) set by the
    # image's aspect ratio. Pad P with zero patches: the model recomputes P_i from image_sizes and
    # keeps only pix[:P_i] of each image (LlavaOnevisionModel.get_image_features), as the
    # processor itself does when it pads several images of one call.
    if key == "pixel_values" and all(t.dim() == 5 and t.shape[2:] == ts[0].shape[2:] for t in ts):
        p = max(t.shape[1] for t in ts)
        return torch.cat([torch.cat([t, t.new_zeros(t.shape[0], p - t.shape[1], *t.shape[2:])], dim=1) for t in ts])
    raise ValueError(f"collate: cannot batch {key!r} tensors of shapes {[tuple(t.shape) for t in ts]}")


def collate(encs: Sequence[dict[str, torch.Tensor]], pad_id: int, side: str = "right") -> dict[str, torch.Tensor]:
    """Pad token-level tensors to the longest sequence; concatenate the per-image ones."""
    length = max(e["input_ids"].shape[1] for e in encs)
    batch: dict[str, torch.Tensor] = {}
    for key in encs[0]:
        if key == POSITION_KEY:  # [3, 1, L]: padded with 0 as get_rope_index pads; rows along dim 1
            rows = []
            for e in encs:
                t = e[key]
                pad = t.new_zeros(*t.shape[:2], length - t.shape[2])
                rows.append(torch.cat([t, pad] if side == "right" else [pad, t], dim=2))
            batch[key] = torch.cat(rows, dim=1)
        elif key in TOKEN_KEYS:
            fill = {"input_ids": pad_id, "labels": IGNORE}.get(key, 0)
            rows = []
            for e in encs:
                t = e[key]
                pad = torch.full((1, length - t.shape[1]), fill, dtype=t.dtype)
                rows.append(torch.cat([t, pad] if side == "right" else [pad, t], dim=1))
            batch[key] = torch.cat(rows)
        else:
            batch[key] = _cat_images(key, [e[key] for e in encs])
    return batch
