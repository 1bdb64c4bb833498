"""Families: tiny models (size, untied head), role regexes against an independent oracle,
image tokens per image, and generation on a left-padded batch."""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch

from lmm_ray import data, families, skills
from lmm_ray.families import FAMILIES, ROLE_ORDER, TinySize
from lmm_ray.registry import UnknownName

FAMS = FAMILIES.names()


def test_the_four_study_families_are_registered():
    assert set(FAMS) == {"qwen2_5_vl", "llava_onevision", "internvl", "llava"}


@pytest.mark.parametrize("family", FAMS)
def test_tiny_model_is_about_one_million_parameters(tiny, family):
    loaded = tiny(family)
    n = sum(p.numel() for p in loaded.model.parameters())
    assert 500_000 <= n <= 2_000_000, f"{family}: {n:,} parameters"
    assert isinstance(loaded.model, loaded.family.model_class)
    assert loaded.model.config.model_type == loaded.family.model_type
    assert loaded.model.config.get_text_config().num_hidden_layers == TinySize().layers


@pytest.mark.parametrize("family", FAMS)
def test_head_is_not_tied_to_embeddings(tiny, family):
    m = tiny(family).model
    assert m.config.tie_word_embeddings is False
    assert m.config.get_text_config().tie_word_embeddings is False
    head = dict(m.named_parameters())["lm_head.weight"]
    emb = dict(m.named_parameters())["model.language_model.embed_tokens.weight"]
    assert head.data_ptr() != emb.data_ptr()
    assert m.get_output_embeddings().weight is not m.get_input_embeddings().weight
    assert not torch.equal(head, emb)


@pytest.mark.parametrize("family", FAMS)
def test_vision_projector_llm_partition_all_parameters(tiny, oracle, family):
    names = [n for n, _ in tiny(family).model.named_parameters()]
    vision = {n for n in names if oracle.is_vision(family, n)}
    proj = {n for n in names if oracle.is_projector(family, n)}
    llm = {n for n in names if oracle.is_llm(n)}
    assert vision and proj and llm
    assert vision | proj | llm == set(names), set(names) - (vision | proj | llm)
    assert not (vision & proj) and not (vision & llm) and not (proj & llm)


@pytest.mark.parametrize("family", FAMS)
def test_role_regexes_give_every_parameter_exactly_its_role(tiny, oracle, family):
    """Each parameter is fully matched by the regexes of exactly one role: the oracle's."""
    fam = families.get_family(family)
    assert set(fam.roles) == set(ROLE_ORDER)
    names = [n for n, _ in tiny(family).model.named_parameters()]
    wrong = {}
    for n in names:
        expected = oracle.role(family, n)
        assert expected != "other", f"{family}: the oracle does not know {n}"
        hits = [r for r, pats in fam.roles.items() if any(re.fullmatch(p, n) for p in pats)]
        if hits != [expected]:
            wrong[n] = (expected, hits)
    assert not wrong, wrong
    # every role exists in every family
    assert {oracle.role(family, n) for n in names} == set(ROLE_ORDER)


@pytest.mark.parametrize(
    "name",
    [
        # the traps: vision modules that end like LLM modules
        "model.visual.blocks.0.mlp.gate_proj.weight",
        "model.visual.blocks.1.mlp.down_proj.bias",
        "model.vision_tower.encoder.layers.0.self_attn.q_proj.weight",
        "model.vision_tower.encoder.layer.0.attention.k_proj.weight",
        # not anchored at the start / end
        "base_model.model.model.language_model.layers.0.self_attn.q_proj.weight",
        "model.language_model.layers.0.self_attn.q_proj.weight.extra",
        "model.language_model.layers.x.self_attn.q_proj.weight",
    ],
)
def test_llm_role_regexes_are_anchored(name):
    for fam in FAMILIES._items.values():
        for role, pats in fam.roles.items():
            if role.startswith("llm."):
                assert not any(re.fullmatch(p, name) for p in pats), (fam.name, role, name)


def _image_tokens(loaded, sample) -> int:
    """How many image tokens (the model's image token id) the processor expands one image into."""
    cfg = loaded.model.config
    image_id = getattr(cfg, "image_token_id", None)
    if image_id is None:
        image_id = cfg.image_token_index
    enc = loaded.processor(text=[data.prompt_text(loaded.processor, sample)], images=[sample.image], return_tensors="pt")
    assert (enc["input_ids"] == image_id).sum() > 0
    return int((enc["input_ids"] == image_id).sum())


def _expected_tokens(family: str, size: TinySize = TinySize()) -> int:
    # TinySize's docstring: (image_size/patch)^2/4 for every family but LLaVA-OneVision, whose
    # "anyres" view adds a crop of the same size and a newline per row: 2n^2 + n.
    if family == "llava_onevision":
        n = size.image_size // (2 * size.patch)
        return 2 * n * n + n
    return (size.image_size // size.patch) ** 2 // 4


@pytest.mark.parametrize("family", FAMS)
def test_image_tokens_per_image_match_the_documented_count(tiny, family):
    sample = skills.generate("color", 1, seed=0)[0]
    assert _image_tokens(tiny(family), sample) == _expected_tokens(family)


@pytest.mark.parametrize("family", FAMS)
def test_generate_on_a_left_padded_batch(tiny, family):
    loaded = tiny(family)
    model = loaded.model
    samples = skills.generate("species", 1, seed=0) + skills.generate("shape", 1, seed=0)
    encs = data.encode_prompts(loaded.processor, samples)
    lengths = [e["input_ids"].shape[1] for e in encs]
    assert lengths[0] > lengths[1] + 5  # the second prompt really gets padded
    batch = data.collate(encs, loaded.tokenizer.pad_token_id, side="left")
    L = batch["input_ids"].shape[1]
    pad = L - lengths[1]
    assert batch["attention_mask"][1, :pad].eq(0).all() and batch["attention_mask"][1, pad:].eq(1).all()
    assert batch["input_ids"][1, :pad].eq(loaded.tokenizer.pad_token_id).all()
    # the prompts end with the assistant header, right before the generated tokens
    for row in batch["input_ids"]:
        assert loaded.tokenizer.decode(row).endswith("<|im_start|>assistant\n")

    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=3, do_sample=False)
        assert out.shape[0] == 2 and L < out.shape[1] <= L + 3
        assert torch.equal(out[:, :L], batch["input_ids"])
        # left padding does not change the next-token distribution of the padded prompt
        padded = model(**batch).logits[1, -1]
        alone = model(**encs[1]).logits[0, -1]
    torch.testing.assert_close(padded, alone, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", FAMS)
def test_family_of_config_finds_the_family(tiny, family):
    assert families.family_of_config(tiny(family).model.config).name == family


def test_family_errors_name_the_valid_choices():
    with pytest.raises(UnknownName, match=r"qwen2_5_vl.*Valid choices: internvl, llava, llava_onevision, qwen2_5_vl"):
        families.get_family("qwen2_5vl")
    with pytest.raises(UnknownName, match="Did you mean 'qwen2_5_vl'"):
        families.get_family("qwen2_5vl")

    class Cfg:
        model_type = "idefics3"

    with pytest.raises(ValueError, match=r"'idefics3' is not a supported family.*qwen2_5_vl \(qwen2_5_vl\)"):
        families.family_of_config(Cfg())


def test_compiled_roles_match_the_raw_regexes():
    fam = families.get_family("qwen2_5_vl")
    compiled = fam.compiled_roles()
    assert list(compiled) == list(fam.roles)
    assert [p.pattern for p in compiled["vision"]] == fam.roles["vision"]
    # dataclasses.replace is how tests build crippled families; it must keep the other fields
    crippled = dataclasses.replace(fam, roles={k: v for k, v in fam.roles.items() if k != "projector"})
    assert "projector" not in crippled.roles and crippled.model_class is fam.model_class
