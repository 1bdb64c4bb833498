"""evaluate.py: answer normalisation, batched generation, bad input, and the `eval` verb."""

from __future__ import annotations

import json
import math

import pytest
import torch

from lmm_ray import cli, models, skills
from lmm_ray import evaluate as ev

SPECIES = ("zorbil", "quenda", "marlop", "tibrek")

# (prediction, gold, answer type, choices, correct?)
TABLE = [
    ("Seven.", "7", "number", (), True),
    ("seven", "7", "number", (), True),
    ("There are 7 dots.", "7", "number", (), True),
    ("there are 3 dots", "3", "number", (), True),
    ("07", "7", "number", (), True),
    ("Twelve", "12", "number", (), True),
    ("3 or 4", "4", "number", (), False),  # the first number counts
    ("seventeen", "7", "number", (), False),  # no "seven" inside "seventeen"
    ("8", "7", "number", (), False),
    ("banana", "7", "number", (), False),
    ("3:05", "03:04", "time", (), True),
    ("3:05", "3:07", "time", (), False),
    ("12:00", "12:01", "time", (), True),
    ("12:59", "1:00", "time", (), False),  # the study compares the hour exactly
    ("3:59", "3:00", "time", (), True),  # ... and accepts a minute difference of 59
    ("0:30", "12:30", "time", (), True),  # 12-hour clock: 0 == 12
    ("15:45", "3:45", "time", (), True),
    ("it is 3 15", "3:15", "time", (), True),  # no H:MM: the first two integers
    ("noon", "12:00", "time", (), False),
    (" Red.", "red", "word", (), True),
    ("The circle", "circle", "word", (), True),
    ("blue", "red", "word", (), False),
    ("B.", "B", "choice", SPECIES, True),
    ("b)", "B", "choice", SPECIES, True),
    ("zorbil", "A", "choice", SPECIES, True),  # the option's text counts as its letter
    ("a quenda", "B", "choice", SPECIES, True),  # not option "A" via the article
    ("C", "B", "choice", SPECIES, False),
    ("Yes, it is", "yes", "yesno", (), True),
    ("no.", "no", "yesno", (), True),
    ("Yes", "no", "yesno", (), False),
    ("", "red", "word", (), False),
]


@pytest.mark.parametrize("pred,gold,kind,choices,ok", TABLE)
def test_is_correct_table(pred, gold, kind, choices, ok):
    assert ev.is_correct(pred, gold, kind, choices) is ok


@pytest.mark.parametrize("text,kind,want", [
    ("Seven.", "number", "7"), ("seven", "number", "7"), ("There are 7 dots.", "number", "7"),
    (" Red.", "word", "red"), ("B.", "choice", "B"), ("b)", "choice", "B"),
    ("Yes, it is", "yesno", "yes"), ("03:04", "time", "3:04"), ("0:05", "time", "12:05"),
])
def test_normalize(text, kind, want):
    assert ev.normalize(text, kind) == want


def test_normalize_option_text_and_unknown_type():
    assert ev.normalize("Marlop!", "choice", SPECIES) == "C"
    with pytest.raises(ValueError):
        ev.normalize("x", "colour")


# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    return models.build_tiny("qwen2_5_vl")


@pytest.fixture(scope="module")
def mixed(tiny):
    """One held-out set whose prompts differ in length (so batches are really left-padded)."""
    samples = (skills.generate("color", 4, seed=3) + skills.generate("presence", 3, seed=3)
               + skills.generate("species", 3, seed=3))
    return ev.build_eval_sets(tiny.processor, {"mixed": samples}, {"mixed": "heldout"})


def spy_generate(monkeypatch, model, fail_on: int | None = None):
    calls, real = [], model.generate

    def spy(*a, **k):
        calls.append(k["input_ids"].shape[0])
        if fail_on is not None and len(calls) == fail_on:
            raise RuntimeError("boom")
        return real(*a, **k)

    monkeypatch.setattr(model, "generate", spy)
    return calls


def test_prompts_differ_in_length(mixed):
    assert len({e["input_ids"].shape[1] for e in mixed["mixed"].encodings}) >= 2


def test_batched_generate_calls_and_equal_to_batch_one(tiny, mixed, monkeypatch):
    calls = spy_generate(monkeypatch, tiny.model)
    batched = ev.evaluate(tiny.model, tiny.processor, mixed, batch_size=4)
    assert calls == [4, 4, 2]  # ceil(10 / 4) generate calls
    calls.clear()
    single = ev.evaluate(tiny.model, tiny.processor, mixed, batch_size=1)
    assert calls == [1] * 10
    b, s = batched.results["mixed"], single.results["mixed"]
    assert b.predictions == s.predictions
    assert b.first_logits.shape == (10, tiny.model.lm_head.weight.shape[0])
    torch.testing.assert_close(b.first_logits, s.first_logits, atol=1e-4, rtol=0)


def test_first_logits_are_the_first_answer_position(tiny, mixed):
    """The kept logits equal a plain forward pass's last-position logits on the prompt."""
    rep = ev.evaluate(tiny.model, tiny.processor, mixed, batch_size=10)
    enc = mixed["mixed"].encodings[0]
    tiny.model.eval()
    with torch.no_grad():
        want = tiny.model(**enc).logits[0, -1]
    torch.testing.assert_close(rep.results["mixed"].first_logits[0], want, atol=1e-4, rtol=0)


def test_score_choices_picks_the_best_letter(tiny):
    sets = ev.build_eval_sets(tiny.processor, {"sp": skills.generate("species", 6, seed=1)}, {"sp": "heldout"})
    rep = ev.evaluate(tiny.model, tiny.processor, sets, score_choices=True)
    r = rep.results["sp"]
    tok = tiny.processor.tokenizer
    letter_ids = [tok("ABCD"[i], add_special_tokens=False)["input_ids"][0] for i in range(4)]
    assert r.predictions == ["ABCD"[int(row[letter_ids].argmax())] for row in r.first_logits]
    assert r.acc == pytest.approx(100 * sum(p == a for p, a in zip(r.predictions, sets["sp"].answers)) / 6)


def test_metrics_names_and_modes_restored(tiny):
    sets = ev.generated_eval_sets(tiny.processor, ["count", "color", "bar_value"], n=4, seed=0)
    tiny.model.train()
    rep = ev.evaluate(tiny.model, tiny.processor, sets)
    assert tiny.model.training  # train mode is given back
    m = rep.metrics()
    assert {"target/count/acc", "heldout/color/acc", "heldout/bar_value/acc", "target/mean_acc",
            "heldout/mean_acc", "probe/number_mass", "probe/entropy", "probe/first_token_acc",
            "probe/heldout_acc_no_numbers"} == set(m)
    assert m["heldout/mean_acc"] == pytest.approx((m["heldout/color/acc"] + m["heldout/bar_value/acc"]) / 2)
    assert all(0 <= m[k] <= 100 for k in m if k.endswith("acc"))
    assert rep.n == {"count": 4, "color": 4, "bar_value": 4}
    # bar_value answers are numbers, so they are left out of the number mass
    assert rep.results["bar_value"].is_number.all() and not rep.results["color"].is_number.any()
    tiny.model.eval()


def test_eval_data_stream_differs_from_training_seed(tiny):
    sets = ev.generated_eval_sets(tiny.processor, ["color"], n=3, seed=0)
    train = skills.generate("color", 3, seed=0)
    assert sets["color"].prompt_ids == [f"color/color-{ev.eval_seed(0)}-{i}" for i in range(3)]
    assert [s.id for s in train] == [f"color-0-{i}" for i in range(3)]
    assert sets["color"].chance == pytest.approx(100 / 6, abs=0.01)


def test_empty_inputs_are_errors(tiny):
    with pytest.raises(ValueError):
        ev.evaluate(tiny.model, tiny.processor, {})
    with pytest.raises(ValueError, match="no samples"):
        ev.build_eval_sets(tiny.processor, {"color": []}, {"color": "heldout"})
    sets = ev.generated_eval_sets(tiny.processor, ["color"], n=2, seed=0)
    sets["color"].answers.clear()
    with pytest.raises(ValueError, match="empty"):
        ev.evaluate(tiny.model, tiny.processor, sets)


def test_failing_batch_raises_no_partial_report(tiny, mixed, monkeypatch):
    spy_generate(monkeypatch, tiny.model, fail_on=2)
    tiny.model.train()
    with pytest.raises(RuntimeError, match="boom"):
        ev.evaluate(tiny.model, tiny.processor, mixed, batch_size=4)
    assert tiny.model.training
    tiny.model.eval()


# ---------------------------------------------------------------------------------------------
# CLI


def test_cli_eval_json_all_generated_skills(capsys):
    assert cli.main(["eval", "--model", "tiny:qwen2_5_vl", "--n", "8", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["model"] == "tiny:qwen2_5_vl" and out["n"] == 8
    m = out["metrics"]
    want = {f"target/{s}/acc" for s in skills.target_skills()} | {f"heldout/{s}/acc" for s in skills.heldout_skills()}
    assert want <= set(m)
    assert {"target/mean_acc", "heldout/mean_acc", "probe/number_mass", "probe/entropy"} <= set(m)
    assert "probe/kl_base" not in m  # no base given
    assert all(math.isfinite(v) for v in m.values())


def test_cli_eval_text(capsys):
    assert cli.main(["eval", "--model", "tiny:qwen2_5_vl", "--n", "2", "--skills", "count,color"]) == 0
    out = capsys.readouterr().out
    assert "target skills" in out and "held-out skills" in out and "number_mass" in out


def test_cli_eval_unknown_skill_before_loading(capsys, monkeypatch):
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("model loaded before validation"))
    assert cli.main(["eval", "--model", "tiny:qwen2_5_vl", "--skills", "color,colr"]) == 2
    err = capsys.readouterr().err
    assert "colr" in err and "Valid choices" in err and "bar_value" in err
