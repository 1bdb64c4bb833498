"""Samples -> model inputs: chat template, image expansion, answer-only labels, padding.

Each sample is encoded once (a dict of tensors with a leading batch dimension of 1) and
batches are made by `collate`, so a stage's training pool is processed by the processor once,
whatever the number of steps.
"""

from __future__ import annotations

from typing import Sequence

import torch

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


def encode_train(processor, samples: Sequence[Sample]) -> list[dict[str, torch.Tensor]]:
    """Prompt + answer, with labels on the answer tokens only (prompt and image tokens masked)."""
    out = []
    for s in samples:
        prompt = prompt_text(processor, s)
        full = full_text(processor, s)
        if not full.startswith(prompt):
            raise ValueError(f"chat template renders the prompt of sample {s.id!r} differently with and without the answer")
        enc = _one(processor, full, s.image)
        prompt_ids = _one(processor, prompt, s.image)["input_ids"][0]
        n_prompt = len(prompt_ids)
        ids = enc["input_ids"]
        if not torch.equal(ids[0, :n_prompt], prompt_ids):
            raise ValueError(f"the tokens of sample {s.id!r}'s prompt change when its answer is appended")
        labels = ids.clone()
        labels[:, :n_prompt] = IGNORE
        enc["labels"] = labels
        out.append(enc)
    return out


def first_answer_token(tokenizer, answer: str) -> int:
    return tokenizer(answer, add_special_tokens=False)["input_ids"][0]


def encode_prompts(processor, samples: Sequence[Sample]) -> list[dict[str, torch.Tensor]]:
    """Prompt only (ending with the assistant header), for generation."""
    return [_one(processor, prompt_text(processor, s), s.image) for s in samples]


def collate(encs: Sequence[dict[str, torch.Tensor]], pad_id: int, side: str = "right") -> dict[str, torch.Tensor]:
    """Pad token-level tensors to the longest sequence; concatenate the per-image ones."""
    length = max(e["input_ids"].shape[1] for e in encs)
    batch: dict[str, torch.Tensor] = {}
    for key in encs[0]:
        if key in TOKEN_KEYS:
            fill = {"input_ids": pad_id, "labels": IGNORE}.get(key, 0)
            rows = []
            for e in encs:
                t = e[key]
                pad = torch.full((1, length - t.shape[1]), fill, dtype=t.dtype)
                rows.append(torch.cat([t, pad] if side == "right" else [pad, t], dim=1))
            batch[key] = torch.cat(rows)
        else:
            batch[key] = torch.cat([e[key] for e in encs])
    return batch
