"""Batched greedy scoring of a model on skills, answer normalisation, and the probe hook.

Protocol (the study's): greedy decoding of the answer after the chat prompt, then a
per-answer-type parse of the text before comparing with the gold answer. Prompts are encoded
once per skill (`EvalSet`) and reused by every stage of a trial. The first generated step's
logits of the held-out prompts are kept and handed to the probe, so the probe costs no pass
of its own.

Evaluation data comes from its own random stream: training pools draw
`skills.generate(name, n, seed=s)`, evaluation draws `seed=EVAL_SEED_OFFSET + s`
(`eval_seed(s)`), so no training seed below 10,000 ever yields the evaluation samples.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch

from lmm_ray import data, probe
from lmm_ray.skills.schema import Sample
from lmm_ray.number_words import COUNT_WORDS

EVAL_SEED_OFFSET = 10_000
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
KINDS = ("target", "heldout")
CHANCE_SAMPLES = 300


def eval_seed(seed: int) -> int:
    return EVAL_SEED_OFFSET + seed


# ---------------------------------------------------------------------------------------------
# Answer normalisation

_WORD_VALUE = {w: i for i, w in enumerate(COUNT_WORDS)}  # zero..twenty, as the study's parse_count
# [0-9], not \d: "٣" is not an answer the scorer should read as 3.
_FIRST_NUMBER = re.compile(r"[0-9]+|\b(?:" + "|".join(COUNT_WORDS) + r")\b")
_ARTICLES = {"a", "an", "the"}
_LETTER = re.compile(r"\b([A-Za-z])[.)]?\b")  # the study's cub200 letter regex
_HMM = re.compile(r"([0-9]{1,2})\s*:\s*([0-9]{2})")


def _words(text: str) -> list[str]:
    return [w for w in re.sub(r"[^\w\s]", " ", text.lower()).split() if w not in _ARTICLES]


def _number(text: str) -> str | None:
    m = _FIRST_NUMBER.search(text.lower())
    if m is None:
        return None
    s = m.group(0)
    return str(_WORD_VALUE[s]) if s in _WORD_VALUE else str(int(s))


def _yesno(text: str) -> str | None:
    return next((w for w in _words(text) if w in ("yes", "no")), None)


def _letter(text: str, choices: Sequence[str] = ()) -> str:
    # The option text itself ("zorbil") counts as its letter; checked first because the letter
    # regex would read the article of "a zorbil" as option A.
    norm = " ".join(_words(text))
    for i, c in enumerate(choices):
        if norm and norm == " ".join(_words(c)):
            return LETTERS[i]
    m = _LETTER.search(text)
    if m:
        return m.group(1).upper()
    return text.strip()[:1].upper()


def parse_time(text: str) -> tuple[int, int] | None:
    """(hour on a 12-hour clock, 1..12, minute) from "H:MM", else from the first two integers."""
    m = _HMM.search(text)
    nums = [int(x) for x in (m.groups() if m else re.findall(r"[0-9]+", text)[:2])]
    if len(nums) < 2:
        return None
    h, mi = nums
    return (h % 12 or 12, mi)


def normalize(answer: str, answer_type: str, choices: Sequence[str] = ()) -> str:
    """The canonical form two answers are compared in (falls back to cleaned words)."""
    words = " ".join(_words(answer))
    if answer_type == "number":
        return _number(answer) or words
    if answer_type == "yesno":
        return _yesno(answer) or words
    if answer_type == "choice":
        return _letter(answer, choices)
    if answer_type == "time":
        t = parse_time(answer)
        return f"{t[0]}:{t[1]:02d}" if t else words
    if answer_type == "word":
        return words
    raise ValueError(f"unknown answer_type {answer_type!r}")


def is_correct(pred: str, gold: str, answer_type: str, choices: Sequence[str] = ()) -> bool:
    """Whether a generated answer counts as right.

    time follows the study's TimeClock `both_accuracy`: the hour must match exactly on a
    12-hour clock (0 == 12, 13 == 1) and the minutes differ by <= 1 or by exactly 59. So
    "3:05" ~ "03:04" and "12:00" ~ "12:01" are right, "12:59" vs "1:00" is wrong (the hour
    differs), and "3:00" vs "3:59" is right (the study's wrap-around rule compares minutes
    only). The generated clock uses a 15-minute grid, so none of these edge cases occur there.
    """
    if answer_type == "time":
        p, g = parse_time(pred), parse_time(gold)
        if p is None or g is None:
            return False
        dm = abs(p[1] - g[1])
        return p[0] == g[0] and (dm <= 1 or dm == 59)
    g = normalize(gold, answer_type, choices)
    return bool(g) and normalize(pred, answer_type, choices) == g


# ---------------------------------------------------------------------------------------------
# Eval sets


@dataclass
class EvalSet:
    """One skill's evaluation data, encoded once and reused by every stage."""

    skill: str
    kind: str  # "target" or "heldout"
    encodings: list[dict[str, torch.Tensor]]
    answers: list[str]
    answer_types: list[str]
    choices: list[tuple[str, ...]]
    prompt_ids: list[str]  # "<skill>/<sample id>": aligns a ProbeBase with these prompts
    gold_first_token: torch.Tensor  # [n] int64
    is_number: torch.Tensor  # [n] bool: answer is a number (or a time), or starts with a number token
    chance: float | None  # pp, see _chance

    def __len__(self) -> int:
        return len(self.answers)


def _chance(samples: Sequence[Sample]) -> float | None:
    """Accuracy of a uniform guess, in pp: 1/#options for choice, 1/2 for yes/no, otherwise
    1/#distinct gold answers of that type in the set (exact for generated skills given enough
    samples; an estimate for open-ended real data)."""
    if not samples:
        return None
    distinct: dict[str, set] = {}
    for s in samples:
        distinct.setdefault(s.answer_type, set()).add(normalize(s.answer, s.answer_type, s.choices))
    per = []
    for s in samples:
        if s.answer_type == "choice" and s.choices:
            per.append(1 / len(s.choices))
        elif s.answer_type == "yesno":
            per.append(0.5)
        else:
            per.append(1 / len(distinct[s.answer_type]))
    return 100.0 * sum(per) / len(per)


def build_eval_sets(processor, samples_by_skill: Mapping[str, Sequence[Sample]],
                    kinds: Mapping[str, str], chance: Mapping[str, float] | None = None) -> dict[str, EvalSet]:
    """Encode each skill's samples once. `kinds[skill]` is "target" or "heldout"; `chance`
    (pp) overrides the estimate from the samples themselves."""
    tok = processor.tokenizer
    num_ids = set(probe.number_token_ids(tok))
    out = {}
    for name, samples in samples_by_skill.items():
        kind = kinds.get(name)
        if kind not in KINDS:
            raise ValueError(f"skill {name!r}: kind must be one of {KINDS}, got {kind!r}")
        if not samples:
            raise ValueError(f"skill {name!r}: no samples to evaluate on")
        gold = torch.tensor([data.first_answer_token(tok, s.answer) for s in samples], dtype=torch.long)
        is_num = torch.tensor([s.answer_type in ("number", "time") or int(g) in num_ids
                               for s, g in zip(samples, gold)], dtype=torch.bool)
        out[name] = EvalSet(
            skill=name,
            kind=kind,
            encodings=data.encode_prompts(processor, samples),
            answers=[s.answer for s in samples],
            answer_types=[s.answer_type for s in samples],
            choices=[tuple(s.choices) for s in samples],
            prompt_ids=[f"{name}/{s.id or i}" for i, s in enumerate(samples)],
            gold_first_token=gold,
            is_number=is_num,
            chance=chance[name] if chance and name in chance else _chance(samples),
        )
    return out


def generated_eval_sets(processor, skills: Sequence[str], n: int, seed: int = 0,
                        image_size: int | None = None) -> dict[str, EvalSet]:
    """Eval sets of generated skills, drawn from the evaluation stream `eval_seed(seed)`."""
    from lmm_ray import skills as registry

    size = registry.DEFAULT_IMAGE_SIZE if image_size is None else image_size
    kinds = {s: registry.get_skill(s).kind for s in skills}
    samples = {s: registry.generate(s, n, seed=eval_seed(seed), image_size=size) for s in skills}
    # A small n sees few distinct answers and would overstate chance; the answer distribution
    # does not depend on the image size, so estimate it from a larger draw of small images.
    chance = {s: _chance(registry.generate(s, CHANCE_SAMPLES, seed=eval_seed(seed), image_size=32)) for s in skills}
    return build_eval_sets(processor, samples, kinds, chance)


# ---------------------------------------------------------------------------------------------
# Report


@dataclass
class SkillResult:
    skill: str
    kind: str
    acc: float  # pp
    predictions: list[str]
    correct: list[bool]
    chance: float | None
    first_logits: torch.Tensor | None = None  # [n, V] float32 (held-out skills only)
    is_number: torch.Tensor | None = None
    gold_first_token: torch.Tensor | None = None
    prompt_ids: list[str] = field(default_factory=list)

    @property
    def n(self) -> int:
        return len(self.predictions)


@dataclass
class EvalReport:
    results: dict[str, SkillResult]
    probe: dict[str, float]
    number_ids: list[int]

    @property
    def acc(self) -> dict[str, float]:
        return {s: r.acc for s, r in self.results.items()}

    @property
    def n(self) -> dict[str, int]:
        return {s: r.n for s, r in self.results.items()}

    @property
    def predictions(self) -> dict[str, list[str]]:
        return {s: r.predictions for s, r in self.results.items()}

    def metrics(self) -> dict[str, float]:
        """The metric names of docs/architecture.md ("Metrics"). A group's mean is present only when the group was evaluated."""
        out: dict[str, float] = {}
        for kind in KINDS:
            accs = [r.acc for r in self.results.values() if r.kind == kind]
            for r in self.results.values():
                if r.kind == kind:
                    out[f"{kind}/{r.skill}/acc"] = r.acc
            if accs:
                out[f"{kind}/mean_acc"] = sum(accs) / len(accs)
        out.update(self.probe)
        return out

    def set_probe_base(self, base: probe.ProbeBase | None) -> None:
        """Recompute the probe against `base` from the kept logits (no model pass). For the base
        model's own report: `r.set_probe_base(ProbeBase.from_report(r))` gives stage 0 the
        same metric names as later stages, with counting_bias and kl_base 0."""
        logits, is_num, gold, ids = self.heldout_first_logits()
        self.probe = probe.probe_stats(logits, is_num, gold, self.number_ids, base, prompt_ids=ids)

    def heldout_first_logits(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[str]]:
        """(first-step logits [P, V], is_number [P], gold first token [P], prompt ids) of all held-out skills."""
        held = [r for r in self.results.values() if r.kind == "heldout"]
        if not held:
            raise ValueError("this report has no held-out skill")
        return (torch.cat([r.first_logits for r in held]), torch.cat([r.is_number for r in held]),
                torch.cat([r.gold_first_token for r in held]), [i for r in held for i in r.prompt_ids])


# ---------------------------------------------------------------------------------------------
# Evaluation


def _eos_ids(model, tokenizer) -> set[int]:
    eos = model.generation_config.eos_token_id
    ids = set(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def _decode(tokenizer, rows: torch.Tensor, eos: set[int]) -> list[str]:
    out = []
    for row in rows.tolist():
        # Cut at the first end-of-turn token: what follows is padding of finished rows.
        end = next((i for i, t in enumerate(row) if t in eos), len(row))
        out.append(tokenizer.decode(row[:end], skip_special_tokens=True).strip())
    return out


def _to(batch: dict[str, torch.Tensor], device, dtype) -> dict[str, torch.Tensor]:
    # Pixel values follow the model's dtype (bf16 checkpoints); ids and masks stay integer.
    return {k: v.to(device, dtype=dtype) if v.is_floating_point() else v.to(device) for k, v in batch.items()}


def evaluate(model, processor, eval_sets: Mapping[str, EvalSet], *, batch_size: int = 64,
             max_new_tokens: int = 8, probe_base: probe.ProbeBase | None = None,
             score_choices: bool = False) -> EvalReport:
    """Accuracy (pp) per skill by batched greedy decoding, plus the probe on held-out skills.

    `score_choices=True` scores `choice` samples by likelihood instead of by their generated
    text: the option letter with the highest first-step log-prob is the prediction (reads the
    same first-step logits, so it costs nothing extra).
    Any failure raises: a report is either complete or not returned.
    """
    if not eval_sets:
        raise ValueError("evaluate: no eval sets given")
    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError("evaluate: batch_size and max_new_tokens must be >= 1")
    for name, es in eval_sets.items():
        if len(es) == 0:
            raise ValueError(f"evaluate: eval set {name!r} is empty")

    tok = processor.tokenizer
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    eos = _eos_ids(model, tok)
    param = next(model.parameters())
    letter_ids = [data.first_answer_token(tok, c) for c in LETTERS]
    results: dict[str, SkillResult] = {}

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for name, es in eval_sets.items():
                has_choice = score_choices and "choice" in es.answer_types
                keep = es.kind == "heldout" or has_choice
                preds: list[str] = []
                firsts: list[torch.Tensor] = []
                for i in range(0, len(es), batch_size):
                    batch = data.collate(es.encodings[i:i + batch_size], pad_id, side="left")
                    prompt_len = batch["input_ids"].shape[1]
                    out = model.generate(**_to(batch, param.device, param.dtype), do_sample=False,
                                         max_new_tokens=max_new_tokens, output_logits=True,
                                         return_dict_in_generate=True, pad_token_id=pad_id)
                    preds += _decode(tok, out.sequences[:, prompt_len:].cpu(), eos)
                    if keep:
                        firsts.append(out.logits[0].float().cpu())
                first = torch.cat(firsts) if keep else None
                if first is not None and first.shape[0] != len(es):
                    raise RuntimeError(f"{name}: got first-step logits for {first.shape[0]} of {len(es)} prompts")
                if has_choice:
                    for j, (t, ch) in enumerate(zip(es.answer_types, es.choices)):
                        if t == "choice" and ch:
                            ids = letter_ids[:len(ch)]
                            preds[j] = LETTERS[int(first[j, ids].argmax())]
                correct = [is_correct(p, a, t, c) for p, a, t, c in zip(preds, es.answers, es.answer_types, es.choices)]
                held = es.kind == "heldout"
                results[name] = SkillResult(
                    skill=name, kind=es.kind, acc=100.0 * sum(correct) / len(correct), predictions=preds,
                    correct=correct, chance=es.chance, first_logits=first if held else None,
                    is_number=es.is_number if held else None, gold_first_token=es.gold_first_token if held else None,
                    prompt_ids=es.prompt_ids if held else [])
    finally:
        model.train(was_training)

    number_ids = probe.number_token_ids(tok)
    report = EvalReport(results, {}, number_ids)
    if any(r.kind == "heldout" for r in results.values()):
        report.set_probe_base(probe_base)
    for k, v in report.metrics().items():
        if not math.isfinite(v):
            raise ValueError(f"evaluate: metric {k} is not finite ({v})")
    return report
