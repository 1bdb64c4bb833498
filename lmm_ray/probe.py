"""Counting-bias probe and output-drift statistics at the first answer position (docs/architecture.md, "Metrics").

Everything here reads the first generated step's logits that `evaluate.evaluate` already kept
for the held-out prompts: the probe never runs its own pass over the data.

- `probe/number_mass`: mean over held-out prompts whose answer is NOT a number of the total
  softmax probability on number tokens; `probe/number_mass_change` = number_mass - base
  number_mass at this stage. The trial-level `counting_bias` (objective.py) is its mean over stages.
- `probe/kl_base`: mean KL(base || model) of the first-answer-token distribution. The bias
  alone misses forgetting when the output head is frozen (the distribution diffuses instead of
  moving to numbers), hence also
- `probe/entropy` (nats), `probe/first_token_acc` and `probe/heldout_acc_no_numbers` (pp): the
  argmax with number tokens excluded tells bias-only forgetting (knowledge still there) from
  real damage.

The base side (`ProbeBase`) is computed once from the base model's logits and saved, so every
stage of every trial compares against the same numbers without re-running the base model.
"""

from __future__ import annotations

import math
import os
import re
import weakref
from dataclasses import dataclass, field
from typing import Sequence

import torch

from lmm_ray.number_words import NUMBER_WORDS

_NUMBER_WORDS = frozenset(NUMBER_WORDS)
# [0-9], not \d: the study skips tokens with non-ASCII digits ("３", "٣"), and so do we.
_NUMERIC = re.compile(r"[0-9]+|[0-9]+(?:st|nd|rd|th)|[0-9]+\.[0-9]+|[0-9]{1,3}(?:,[0-9]{3})+")
_SPACE_MARKERS = "Ġ▁ "  # byte-level BPE, SentencePiece, literal space

TOP_K = 256


def is_number_token(text: str) -> bool:
    """Whether one vocabulary entry counts as a number token (docs/architecture.md, "Metrics")."""
    t = text.strip().strip(_SPACE_MARKERS).strip()
    if not t:
        return False
    return bool(_NUMERIC.fullmatch(t)) or t.lower() in _NUMBER_WORDS


# Cached per tokenizer object; the vocabulary size is part of the entry so that adding tokens
# afterwards recomputes the set instead of silently missing them.
_NUMBER_IDS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def number_token_ids(tokenizer) -> list[int]:
    """Ids of every vocabulary entry that is a number token, sorted (from `get_vocab()`)."""
    vocab = tokenizer.get_vocab()
    hit = _NUMBER_IDS.get(tokenizer)
    if hit is not None and hit[0] == len(vocab):
        return list(hit[1])
    ids = sorted(i for tok, i in vocab.items() if is_number_token(tok))
    try:
        _NUMBER_IDS[tokenizer] = (len(vocab), tuple(ids))
    except TypeError:  # not weak-referenceable: just do not cache
        pass
    return ids


def generated_number_mass(step_logits: Sequence[torch.Tensor], sequences: torch.Tensor, eos: set[int],
                          number_ids: Sequence[int]) -> list[float]:
    """Per row: the probability mass on number tokens averaged over the steps it generated (up to
    and including its first end-of-turn token): the study's probe on caption-style prompts."""
    v = step_logits[0].shape[-1]
    mask = _number_mask(v, number_ids)
    mass = torch.stack([lg.float().softmax(-1)[:, mask].sum(-1) for lg in step_logits], dim=1)  # [B, T]
    out = []
    for row, seq in zip(mass, sequences.tolist()):
        end = next((i + 1 for i, t in enumerate(seq) if t in eos), len(seq))
        out.append(row[:max(1, end)].mean().item())
    return out


# ---------------------------------------------------------------------------------------------
# Base statistics


def _number_mask(vocab_size: int, number_ids: Sequence[int]) -> torch.Tensor:
    mask = torch.zeros(vocab_size, dtype=torch.bool)
    ids = [i for i in number_ids if i < vocab_size]
    mask[ids] = True
    return mask


def _number_mass(logp: torch.Tensor, num_mask: torch.Tensor, non_number: torch.Tensor) -> float | None:
    if not bool(non_number.any()):
        return None
    return logp[non_number][:, num_mask].exp().sum(-1).mean().item()


def _rest_logp(logp: torch.Tensor, top_ids: torch.Tensor) -> torch.Tensor:
    """log of the probability mass outside `top_ids`, per row (-inf when nothing is outside)."""
    return logp.scatter(1, top_ids, float("-inf")).logsumexp(-1)


@dataclass
class ProbeBase:
    """The base model's first-answer-token statistics on the held-out prompts.

    Per prompt it keeps the base's top-k tokens (k = min(V, 256)) with their log-probs and the
    log of the remaining mass. KL(base || model) is then computed over the partition
    {each top-k token, everything else}: exact when V <= k, otherwise the KL of both
    distributions coarsened to that partition, which is a lower bound of the exact KL (a
    coarsening never increases a KL divergence). With a near-deterministic base the top-k
    holds almost all its mass, so the bound is tight where it matters.
    """

    number_mass: float | None  # None when every held-out answer is a number
    top_ids: torch.Tensor  # [P, k] int64
    top_logp: torch.Tensor  # [P, k] float32
    rest_logp: torch.Tensor  # [P] float32, log of the base mass outside top_ids
    vocab_size: int
    prompt_ids: list[str] = field(default_factory=list)  # sample ids, to refuse misaligned prompts

    @property
    def n(self) -> int:
        return self.top_ids.shape[0]

    @property
    def exact(self) -> bool:
        return self.top_ids.shape[1] >= self.vocab_size

    @classmethod
    def from_logits(cls, first_logits: torch.Tensor, is_number_answer: torch.Tensor, number_ids: Sequence[int],
                    prompt_ids: Sequence[str] = (), k: int = TOP_K) -> "ProbeBase":
        logp = first_logits.float().log_softmax(-1)
        v = logp.shape[-1]
        top_logp, top_ids = logp.topk(min(v, k), dim=-1)
        mask = _number_mask(v, number_ids)
        return cls(_number_mass(logp, mask, ~is_number_answer.bool()), top_ids, top_logp,
                   _rest_logp(logp, top_ids), v, list(prompt_ids))

    @classmethod
    def from_report(cls, report, number_ids: Sequence[int] | None = None, k: int = TOP_K) -> "ProbeBase":
        """From the `EvalReport` of the base model (its held-out skills' first-step logits)."""
        logits, is_num, _gold, ids = report.heldout_first_logits()
        return cls.from_logits(logits, is_num, report.number_ids if number_ids is None else number_ids, ids, k)

    def kl(self, logp: torch.Tensor) -> torch.Tensor:
        """KL(base || model) per prompt, from the model's log-probs [P, V]."""
        if logp.shape != (self.n, self.vocab_size):
            raise ValueError(f"probe base covers {self.n} prompts x {self.vocab_size} tokens, "
                             f"the model's logits are {tuple(logp.shape)}")
        q_top = logp.gather(1, self.top_ids)
        q_rest = _rest_logp(logp, self.top_ids)
        kl = (self.top_logp.exp() * (self.top_logp - q_top)).sum(-1)
        p_rest = self.rest_logp.exp()
        # 0 * log 0 = 0: with V <= k (or all mass in the top-k) the rest bin is empty.
        rest = torch.where(p_rest > 0, p_rest * (self.rest_logp - q_rest), torch.zeros_like(p_rest))
        # Rounding can leave a few 1e-7 below zero when the two distributions agree.
        return (kl + rest).clamp_min(0.0)

    def save(self, path: str | os.PathLike) -> None:
        torch.save({"number_mass": self.number_mass, "top_ids": self.top_ids, "top_logp": self.top_logp,
                    "rest_logp": self.rest_logp, "vocab_size": self.vocab_size,
                    "prompt_ids": list(self.prompt_ids)}, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ProbeBase":
        d = torch.load(path, weights_only=True)
        return cls(d["number_mass"], d["top_ids"], d["top_logp"], d["rest_logp"], int(d["vocab_size"]),
                   list(d["prompt_ids"]))


# ---------------------------------------------------------------------------------------------


def probe_stats(first_logits: torch.Tensor, is_number_answer: torch.Tensor, gold_first_token: torch.Tensor,
                number_ids: Sequence[int], base: ProbeBase | None = None,
                prompt_ids: Sequence[str] | None = None) -> dict[str, float]:
    """Probe metrics over held-out prompts (rows of `first_logits`, [P, V]).

    Keys: probe/number_mass, probe/entropy, probe/first_token_acc, probe/heldout_acc_no_numbers,
    and with a base probe/number_mass_change and probe/kl_base. A statistic defined over non-number
    prompts is left out when there are none, rather than reported as 0.
    """
    if first_logits.ndim != 2 or first_logits.shape[0] == 0:
        raise ValueError(f"probe_stats needs logits [prompts, vocab] with at least one prompt, got {tuple(first_logits.shape)}")
    n = first_logits.shape[0]
    if len(is_number_answer) != n or len(gold_first_token) != n:
        raise ValueError("probe_stats: logits, is_number_answer and gold_first_token disagree on the prompt count")
    logp = first_logits.float().log_softmax(-1)
    num_mask = _number_mask(logp.shape[-1], number_ids)
    non_number = ~is_number_answer.bool()
    gold = gold_first_token.long()

    out: dict[str, float] = {
        "probe/entropy": torch.special.entr(logp.exp()).sum(-1).mean().item(),
        "probe/first_token_acc": 100.0 * (logp.argmax(-1) == gold).float().mean().item(),
    }
    mass = _number_mass(logp, num_mask, non_number)
    if mass is not None:
        out["probe/number_mass"] = mass
        no_num = logp[non_number].masked_fill(num_mask, float("-inf")).argmax(-1)
        out["probe/heldout_acc_no_numbers"] = 100.0 * (no_num == gold[non_number]).float().mean().item()
    if base is not None:
        if prompt_ids is not None and base.prompt_ids and list(prompt_ids) != list(base.prompt_ids):
            raise ValueError("probe base was computed on other held-out prompts than these; "
                             "build it from the base model's report on the same eval sets")
        out["probe/kl_base"] = base.kl(logp).mean().item()
        if mass is not None and base.number_mass is not None:
            out["probe/number_mass_change"] = mass - base.number_mass
    for k, v in out.items():
        if not math.isfinite(v):
            raise ValueError(f"{k} is not finite ({v}): the logits contain NaN or inf")
    return out
