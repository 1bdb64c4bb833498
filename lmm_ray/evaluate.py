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
from dataclasses import dataclass, field, replace
from typing import Mapping, Sequence

import torch

from lmm_ray import data, metrics, probe, stream
from lmm_ray.answers import LETTERS, is_correct, normalize  # noqa: F401 - the typed rules, re-exported
from lmm_ray.skills.loaders import SamplePlan
from lmm_ray.skills.schema import Sample
from lmm_ray.tasks import EvalTask, render

EVAL_SEED_OFFSET = 10_000
KINDS = ("target", "heldout")
CHANCE_SAMPLES = 300


def eval_seed(seed: int) -> int:
    return EVAL_SEED_OFFSET + seed


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
    task: EvalTask = field(default_factory=EvalTask)
    all_answers: list[tuple[str, ...]] = field(default_factory=list)  # every gold answer (VQA's 10, DocVQA's)
    metric_names: list[str] = field(default_factory=list)  # per sample: a metrics.METRICS name
    categories: list[str] = field(default_factory=list)  # per sample ("" if none): for macro averages
    prompts: list[str] = field(default_factory=list)  # the rendered question text (for predictions files)

    def __len__(self) -> int:
        return len(self.answers)

    def max_new_tokens(self, default: int) -> int:
        return self.task.max_new_tokens or default


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
                    kinds: Mapping[str, str], chance: Mapping[str, float] | None = None,
                    tasks: Mapping[str, EvalTask] | None = None) -> dict[str, EvalSet]:
    """Encode each skill's samples once, prompted as its task says (tasks.py; default: the question
    as written, scored by answer type). `kinds[skill]` is "target" or "heldout"; `chance` (pp)
    overrides the estimate from the samples themselves."""
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
        task = (tasks or {}).get(name) or EvalTask()
        for m in {task.metric_for(s) for s in samples}:
            metrics.METRICS.get(m)  # an unknown metric fails here, before any generation
        # Plans stay plans: their items (text only, images unopened) take the rendered prompt.
        prompted = [replace(s, question=render(task, s)) for s in samples]
        if isinstance(samples, SamplePlan):
            prompted = SamplePlan(prompted, samples.source)
        out[name] = EvalSet(
            skill=name,
            kind=kind,
            encodings=data.encode_prompts(processor, prompted),
            answers=[s.answer for s in samples],
            answer_types=[s.answer_type for s in samples],
            choices=[tuple(s.choices) for s in samples],
            prompt_ids=[f"{name}/{s.id or i}" for i, s in enumerate(samples)],
            gold_first_token=gold,
            is_number=is_num,
            chance=chance[name] if chance and name in chance else _chance(samples),
            task=task,
            all_answers=[tuple(s.answers) or (s.answer,) for s in samples],  # (plan items may leave answers empty)
            metric_names=[task.metric_for(s) for s in samples],
            categories=[s.category for s in samples],
            prompts=[s.question for s in prompted],
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
    acc: float  # pp: the task's aggregation of `scores`
    predictions: list[str]
    scores: list[float]  # per sample, in [0, 1] (the task's metric)
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
    extra_records: dict[str, list[dict]] = field(default_factory=dict)  # predictions of skills scored elsewhere (lmms-eval)

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
        # (held-out skills scored by lmms-eval keep no first-step logits: the probe reads the others)
        held = [r for r in self.results.values() if r.kind == "heldout" and r.first_logits is not None]
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


CAPTION_PROMPT = "Describe the image in one sentence."


def caption_encodings(processor, samples_by_skill: Mapping[str, Sequence[Sample]], n: int) -> list[dict]:
    """Caption-style prompts on the first `n` images of each given (held-out) skill."""
    items = [replace(s, question=CAPTION_PROMPT) for samples in samples_by_skill.values() for s in list(samples)[:n]]
    lazy = any(isinstance(s, SamplePlan) for s in samples_by_skill.values())  # plans: encode per batch
    return data.encode_prompts(processor, SamplePlan(items, "captions") if lazy else items)


def caption_probe(model, processor, encodings: Sequence[dict], *, batch_size: int, max_new_tokens: int) -> float:
    """The study's counting-bias probe: the number-token probability mass averaged over the
    generated steps of caption prompts (mean over prompts). Every rank runs every prompt."""
    tok = processor.tokenizer
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    eos, number_ids = _eos_ids(model, tok), probe.number_token_ids(tok)
    param = next(model.parameters())
    masses: list[float] = []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for i in range(0, len(encodings), batch_size):
                batch = data.collate(list(encodings[i:i + batch_size]), pad_id, side="left")
                out = model.generate(**_to(batch, param.device, param.dtype), do_sample=False, max_new_tokens=max_new_tokens,
                                     output_logits=True, return_dict_in_generate=True, pad_token_id=pad_id)
                gen = out.sequences[:, batch["input_ids"].shape[1]:].cpu()
                masses += probe.generated_number_mass([lg.cpu() for lg in out.logits], gen, eos, number_ids)
    finally:
        model.train(was_training)
    return sum(masses) / len(masses)


def score_samples(es: EvalSet, preds: Sequence[str]) -> list[float | None]:
    """Each prediction's score in [0, 1] by its sample's metric (None: the metric leaves it out)."""
    answers = es.all_answers or [(a,) for a in es.answers]
    names = es.metric_names or [f"typed_{t}" for t in es.answer_types]
    return [metrics.METRICS.get(m)(p, list(a), list(c) if c else None)
            for p, a, c, m in zip(preds, answers, es.choices, names)]


def skill_result(es: EvalSet, preds: list[str], scores: list[float | None], first: torch.Tensor | None) -> SkillResult:
    """A skill's result: its task's aggregation of the scores (pp), and what the probe needs."""
    cats = es.categories or [""] * len(scores)
    kept = [(v, c) for v, c in zip(scores, cats) if v is not None]
    agg = metrics.AGGREGATIONS.get(es.task.aggregation)
    acc = 100.0 * agg([v for v, _ in kept], [c for _, c in kept]) if kept else float("nan")
    held = es.kind == "heldout"
    return SkillResult(
        skill=es.skill, kind=es.kind, acc=acc, predictions=list(preds), scores=list(scores), chance=es.chance,
        first_logits=first if held else None, is_number=es.is_number if held else None,
        gold_first_token=es.gold_first_token if held else None, prompt_ids=es.prompt_ids if held else [])


def prediction_records(report: EvalReport, eval_sets: Mapping[str, EvalSet]) -> dict[str, list[dict]]:
    """{skill: [{id, prompt, prediction, answers, choices, category, metric, score}]}: what
    `lmm-ray score` re-scores (predictions files of every stage)."""
    out = dict(report.extra_records)
    for name, r in report.results.items():
        if name in out:
            continue
        es = eval_sets[name]
        answers = es.all_answers or [(a,) for a in es.answers]
        names = es.metric_names or [f"typed_{t}" for t in es.answer_types]
        out[name] = [{"id": es.prompt_ids[j], "prompt": es.prompts[j] if es.prompts else "", "prediction": r.predictions[j],
                      "answers": list(answers[j]), "choices": list(es.choices[j]),
                      "category": es.categories[j] if es.categories else "", "metric": names[j], "score": r.scores[j]}
                     for j in range(len(r.predictions))]
    return out


def evaluate(model, processor, eval_sets: Mapping[str, EvalSet], *, batch_size: int = 64,
             max_new_tokens: int = 8, probe_base: probe.ProbeBase | None = None,
             score_choices: bool = False, num_workers: int = 0) -> EvalReport:
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
                for batch in stream.eval_batches(es.encodings, batch_size, pad_id, side="left", num_workers=num_workers):
                    prompt_len = batch["input_ids"].shape[1]
                    out = model.generate(**_to(batch, param.device, param.dtype), do_sample=False,
                                         max_new_tokens=es.max_new_tokens(max_new_tokens), output_logits=True,
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
                results[name] = skill_result(es, preds, score_samples(es, preds), first)
    finally:
        model.train(was_training)

    return make_report(results, tok, probe_base)


def make_report(results: dict[str, SkillResult], tokenizer, probe_base: probe.ProbeBase | None) -> EvalReport:
    """The report of complete skill results: the probe against `probe_base`, every metric finite."""
    report = EvalReport(results, {}, probe.number_token_ids(tokenizer))
    if any(r.kind == "heldout" for r in results.values()):
        report.set_probe_base(probe_base)
    for k, v in report.metrics().items():
        if not math.isfinite(v):
            raise ValueError(f"evaluate: metric {k} is not finite ({v})")
    return report
