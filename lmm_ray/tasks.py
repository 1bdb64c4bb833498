"""How a skill is evaluated: its prompt, generation length, metric and aggregation.

An `EvalTask` is declared with a data source in the sweep file (keys `metric`, `aggregation`,
`pre_prompt`, `post_prompt`, `context_template`, `max_new_tokens`) and defaulted by the benchmark
presets (skills/benchmarks.yaml, each checked against an lmms-eval task file), so a held-out
benchmark is prompted and scored as lmms-eval does it:

    prompt = pre_prompt + context_template.format(context=...) + question + post_prompt

The prompt parts apply to evaluation only: training samples keep their question as written.
Generated skills have no task: they are scored by their answer type (metric `typed_<type>`,
answers.py) with the sweep's `eval.max_new_tokens`.
"""

from __future__ import annotations

from dataclasses import dataclass

from lmm_ray.skills.schema import Sample

EVAL_KEYS = ("metric", "aggregation", "pre_prompt", "post_prompt", "context_template", "max_new_tokens")


@dataclass(frozen=True)
class EvalTask:
    metric: str | None = None  # a metrics.METRICS name; None: the sample's answer-type rule
    aggregation: str = "mean"  # mean | macro (over the samples' categories)
    pre_prompt: str = ""
    post_prompt: str = ""
    context_template: str = "{context}\n"  # used when a sample has a context (ScienceQA's hint)
    max_new_tokens: int | None = None  # None: eval.max_new_tokens

    def metric_for(self, sample: Sample) -> str:
        return self.metric or f"typed_{sample.answer_type}"


def split_source(source: dict | None) -> tuple[dict | None, EvalTask]:
    """(the source without its evaluation keys, for the loaders; its EvalTask). A benchmark
    preset's declared keys are the defaults; keys given in the sweep file win."""
    if source is None:
        return None, EvalTask()
    declared: dict = {}
    if "benchmark" in source:
        from lmm_ray.skills import benchmarks

        preset = benchmarks.get(source["benchmark"])
        declared = {k: preset[k] for k in EVAL_KEYS if preset.get(k) is not None}
    given = {k: source[k] for k in EVAL_KEYS if source.get(k) is not None}
    load = {k: v for k, v in source.items() if k not in EVAL_KEYS}
    return load, EvalTask(**{**declared, **given})


def render(task: EvalTask, sample: Sample) -> str:
    """The evaluation prompt text of a sample (what goes next to its image)."""
    context = task.context_template.format(context=sample.context) if sample.context else ""
    return f"{task.pre_prompt}{context}{sample.question}{task.post_prompt}"
