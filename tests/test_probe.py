"""probe.py: number tokens, the counting-bias value computed by hand, KL to the base, save/load."""

from __future__ import annotations

import copy
import re

import pytest
import torch

from lmm_ray import evaluate as ev
from lmm_ray import models, probe

WORDS = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
         "sixteen seventeen eighteen nineteen twenty thirty forty fifty sixty seventy eighty ninety "
         "hundred thousand million billion").split()
HELDOUT = ["color", "shape", "bar_value"]


class FakeTokenizer:
    def __init__(self, vocab):
        self.vocab = {t: i for i, t in enumerate(vocab)}

    def get_vocab(self):
        return dict(self.vocab)


def test_number_token_ids_hand_made_vocabulary():
    yes = ["0", "7", "42", "Ġ12", "▁3", " 5", "1st", "Ġ22nd", "3rd", "4th", "3.14", "Ġ0.5", "1,000",
           "12,345,678", "seven", "Seven", "ĠTWENTY", "▁ninety", "hundred", "Ġbillion"]
    no = ["bone", "Ġphone", "someone", "seventeenth", "١٢", "３", "²", "1.2.3", "1,00", "12,3456", "1.",
          ".5", "1st2", "a1", "Ġ", "▁", "", "twentyone", "Ġone two", "x"]
    tok = FakeTokenizer(yes + no)
    ids = probe.number_token_ids(tok)
    assert [t for t, i in tok.vocab.items() if i in ids] == yes


@pytest.fixture(scope="module")
def tiny():
    return models.build_tiny("qwen2_5_vl")


def test_number_token_ids_local_tokenizer(tiny):
    tok = tiny.processor.tokenizer
    vocab = tok.get_vocab()
    ids = set(probe.number_token_ids(tok))
    names = {t for t, i in vocab.items() if i in ids}
    assert {str(d) for d in range(10)} <= names
    assert {"12", "Ġ12", "seven", "Ġseven", "twenty"} <= names
    assert not names & {t for t in vocab if "one" in t and t.replace("Ġ", "").lower() != "one"}
    assert not any(t.startswith("<") for t in names)
    assert probe.number_token_ids(tok) == sorted(ids)  # cached and stable


def hand_number_ids(tok) -> list[int]:
    """Built independently from the vocabulary (the local tokenizer has only digits and words)."""
    return [i for t, i in tok.get_vocab().items()
            if re.fullmatch(r"[0-9]+", t.lstrip("Ġ")) or t.lstrip("Ġ").lower() in WORDS]


@pytest.fixture(scope="module")
def evalsets(tiny):
    return ev.generated_eval_sets(tiny.processor, HELDOUT, n=8, seed=0)


@pytest.fixture(scope="module")
def base_report(tiny, evalsets):
    return ev.evaluate(tiny.model, tiny.processor, evalsets, batch_size=16)


def test_number_mass_equals_hand_computation(tiny, base_report):
    logits, is_num, gold, _ = base_report.heldout_first_logits()
    assert logits.shape[0] == 24 and is_num.sum() == 8  # bar_value's answers are numbers
    num = hand_number_ids(tiny.processor.tokenizer)
    p = logits.softmax(-1)
    want = p[~is_num][:, num].sum(-1).mean().item()
    got = base_report.metrics()["probe/number_mass"]
    assert got == pytest.approx(want, abs=1e-6)
    ent = -(p * p.log()).sum(-1).mean().item()
    assert base_report.metrics()["probe/entropy"] == pytest.approx(ent, abs=1e-4)
    masked = logits[~is_num].clone()
    masked[:, num] = -float("inf")
    no_num = 100 * (masked.argmax(-1) == gold[~is_num]).float().mean().item()
    assert base_report.metrics()["probe/heldout_acc_no_numbers"] == pytest.approx(no_num)


def digit_biased(model, ids, boost=6.0):
    """The same model whose output head adds `boost` to the logits of the number tokens."""
    head = model.lm_head
    new = torch.nn.Linear(head.in_features, head.out_features, bias=True)
    with torch.no_grad():
        new.weight.copy_(head.weight)
        new.bias.zero_()
        new.bias[ids] = boost
    model.lm_head = new
    return head


def test_counting_bias_and_kl_rise_when_head_favours_numbers(tiny, evalsets, base_report, tmp_path):
    base = probe.ProbeBase.from_report(base_report)
    assert base.number_mass == pytest.approx(base_report.metrics()["probe/number_mass"], abs=1e-6)
    same = ev.evaluate(tiny.model, tiny.processor, evalsets, batch_size=16, probe_base=base).metrics()
    assert same["probe/kl_base"] == pytest.approx(0.0, abs=1e-6)
    assert same["probe/number_mass_change"] == pytest.approx(0.0, abs=1e-6)
    # stage 0: the base report against its own base, without another pass over the data
    stage0 = copy.copy(base_report)
    stage0.set_probe_base(base)
    assert set(stage0.metrics()) == set(same)
    assert stage0.metrics()["probe/kl_base"] == pytest.approx(0.0, abs=1e-6)

    old = digit_biased(tiny.model, hand_number_ids(tiny.processor.tokenizer))
    try:
        biased = ev.evaluate(tiny.model, tiny.processor, evalsets, batch_size=16, probe_base=base).metrics()
    finally:
        tiny.model.lm_head = old
    assert biased["probe/number_mass"] > base.number_mass + 0.3
    assert biased["probe/number_mass_change"] == pytest.approx(biased["probe/number_mass"] - base.number_mass)
    assert biased["probe/kl_base"] > 0.1

    # a sweep computes the base once and every trial loads it
    base.save(tmp_path / "probe_base.pt")
    loaded = probe.ProbeBase.load(tmp_path / "probe_base.pt")
    logits, is_num, gold, ids = base_report.heldout_first_logits()
    num = base_report.number_ids
    biased_logits = logits + torch.zeros(logits.shape[1]).index_fill_(0, torch.tensor(num), 6.0)
    for lg in (logits, biased_logits):
        a = probe.probe_stats(lg, is_num, gold, num, base, prompt_ids=ids)
        b = probe.probe_stats(lg, is_num, gold, num, loaded, prompt_ids=ids)
        assert a == b
    assert loaded.prompt_ids == base.prompt_ids and loaded.vocab_size == base.vocab_size


def test_probe_base_refuses_other_prompts(tiny, base_report):
    base = probe.ProbeBase.from_report(base_report)
    logits, is_num, gold, ids = base_report.heldout_first_logits()
    with pytest.raises(ValueError, match="other held-out prompts"):
        probe.probe_stats(logits, is_num, gold, base_report.number_ids, base, prompt_ids=ids[::-1])
    with pytest.raises(ValueError):
        probe.probe_stats(logits[:5], is_num[:5], gold[:5], base_report.number_ids, base)


def exact_kl(p_logits, q_logits):
    lp, lq = p_logits.log_softmax(-1), q_logits.log_softmax(-1)
    return (lp.exp() * (lp - lq)).sum(-1)


def test_kl_exact_when_vocab_fits_and_lower_bound_otherwise():
    g = torch.Generator().manual_seed(0)
    p, q = torch.randn(6, 40, generator=g) * 3, torch.randn(6, 40, generator=g) * 3
    is_num, gold = torch.zeros(6, dtype=torch.bool), torch.zeros(6, dtype=torch.long)
    full = probe.ProbeBase.from_logits(p, is_num, [1, 2], k=256)  # V=40 <= k
    assert full.exact
    torch.testing.assert_close(full.kl(q.log_softmax(-1)), exact_kl(p, q), atol=1e-5, rtol=1e-5)
    coarse = probe.ProbeBase.from_logits(p, is_num, [1, 2], k=5)
    assert not coarse.exact
    kl_c, kl_e = coarse.kl(q.log_softmax(-1)), exact_kl(p, q)
    assert (kl_c <= kl_e + 1e-5).all() and (kl_c > 0).all()
    # the coarse KL is the KL of the distributions over {top-5 of base, rest}, by hand
    lp, lq = p.log_softmax(-1), q.log_softmax(-1)
    top = lp.topk(5, -1).indices
    pb = torch.cat([lp.exp().gather(1, top), 1 - lp.exp().gather(1, top).sum(-1, keepdim=True)], 1)
    qb = torch.cat([lq.exp().gather(1, top), 1 - lq.exp().gather(1, top).sum(-1, keepdim=True)], 1)
    torch.testing.assert_close(kl_c, (pb * (pb / qb).log()).sum(-1), atol=1e-5, rtol=1e-4)


def test_probe_stats_without_non_number_prompts_omits_number_stats():
    lg = torch.randn(3, 20)
    s = probe.probe_stats(lg, torch.ones(3, dtype=torch.bool), torch.zeros(3, dtype=torch.long), [1, 2])
    assert set(s) == {"probe/entropy", "probe/first_token_acc"}
    with pytest.raises(ValueError):
        probe.probe_stats(torch.empty(0, 20), torch.ones(0), torch.zeros(0), [1])
