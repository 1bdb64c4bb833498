"""Recipes: every recipe x every family resolves to the independently expected parameters, one
optimizer step on a real batch moves exactly those, LoRA adapters sit only on LLM modules,
layer restrictions, patterns, and errors that name the recipe, the family and the choices."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from lmm_ray import data, families, recipes, skills
from lmm_ray.recipes import RECIPES, RecipeError, RecipeSpec
from lmm_ray.registry import UnknownName

FAMS = families.FAMILIES.names()
RECIPE_NAMES = RECIPES.names()
LLM_RECIPES = ["sa_proj", "sa_qkv", "mlp", "mlp_gate_up", "mlp_down", "llm", "lora", "lwf", "wise_ft"]
IGNORE = -100


def test_the_study_recipes_are_registered(oracle):
    assert set(RECIPE_NAMES) == set(oracle.recipe_predicates())
    assert set(LLM_RECIPES) <= set(RECIPE_NAMES)


# ---------------------------------------------------------------------------------------------
# 1. resolved set == independent expectation


@pytest.mark.parametrize("family", FAMS)
@pytest.mark.parametrize("recipe", RECIPE_NAMES)
def test_resolved_parameters_equal_the_expected_set(tiny, oracle, family, recipe):
    loaded = tiny(family)
    params = dict(loaded.model.named_parameters())
    res = recipes.resolve(loaded.model, loaded.family, recipe)
    expected = oracle.expected_names(recipe, family, params)
    assert len(res.names) == len(set(res.names))
    assert set(res.names) == expected, (sorted(set(res.names) - expected), sorted(expected - set(res.names)))
    total = sum(p.numel() for p in params.values())
    lora = oracle.lora_modules(recipe, family, params.items())
    assert sorted(res.lora_targets) == sorted(lora)
    adapters = sum(RECIPES.get(recipe).lora.rank * (o + i) for o, i in lora.values()) if lora else 0
    assert res.trainable == sum(params[n].numel() for n in expected) + adapters
    assert res.total == total + adapters
    assert sum(res.by_role.values()) == res.trainable
    assert res.family == family and res.recipe.name == recipe
    if recipe == "full":
        assert set(res.names) == set(params) and res.trainable == res.total == total
    else:
        assert 0 < res.share < 1


@pytest.mark.parametrize("family", FAMS)
def test_each_role_alone_resolves_to_its_oracle_parameters(tiny, oracle, family):
    loaded = tiny(family)
    names = [n for n, _ in loaded.model.named_parameters()]
    covered: list[str] = []
    for role in families.ROLE_ORDER:
        spec = RecipeSpec.from_dict(f"only_{role}", {"roles": [role]})
        got = recipes.resolve(loaded.model, loaded.family, spec).names
        assert set(got) == {n for n in names if oracle.role(family, n) == role}, role
        covered += got
    assert sorted(covered) == sorted(names)  # the roles partition the model: each parameter once


# ---------------------------------------------------------------------------------------------
# 2. LLM recipes never touch the vision tower or the projector


@pytest.mark.parametrize("family", FAMS)
@pytest.mark.parametrize("recipe", LLM_RECIPES)
def test_llm_recipes_never_include_vision_or_projector(tiny, oracle, family, recipe):
    loaded = tiny(family)
    res = recipes.resolve(loaded.model, loaded.family, recipe)
    touched = res.names + [t + ".weight" for t in res.lora_targets]
    assert touched
    bad = [n for n in touched if oracle.is_vision(family, n) or oracle.is_projector(family, n)]
    assert not bad
    assert all(oracle.is_llm(n) for n in touched)
    assert set(res.by_role) <= {r for r in families.ROLE_ORDER if r.startswith("llm.")}
    if recipe == "mlp_gate_up":
        assert not any("down_proj" in n for n in touched)
        assert any("gate_proj" in n for n in touched) and any("up_proj" in n for n in touched)
    if recipe == "sa_qkv":
        assert not any("o_proj" in n for n in touched)
    if recipe == "llm":
        assert "model.language_model.embed_tokens.weight" in res.names and "lm_head.weight" in res.names
        assert "model.language_model.norm.weight" in res.names


# ---------------------------------------------------------------------------------------------
# 3. one optimizer step on a real batch moves exactly the trainable tensors


@pytest.fixture(scope="module")
def train_batch(tiny):
    """`train_batch(family)` -> (batch, samples): 2 'color' + 2 'clock' samples, right-padded."""
    cache = {}

    def get(family):
        if family not in cache:
            loaded = tiny(family)
            samples = skills.generate("color", 2, seed=1) + skills.generate("clock", 2, seed=1)
            encs = data.encode_train(loaded.processor, samples)
            cache[family] = (data.collate(encs, loaded.tokenizer.pad_token_id), samples)
        return cache[family]

    return get


@pytest.mark.parametrize("family", FAMS)
def test_labels_are_the_answer_and_end_tokens_only(tiny, train_batch, family):
    batch, samples = train_batch(family)
    tok = tiny(family).tokenizer
    assert batch["input_ids"].shape == batch["labels"].shape and batch["input_ids"].shape[0] == 4
    assert "pixel_values" in batch
    for i, s in enumerate(samples):
        ids, labels, mask = batch["input_ids"][i], batch["labels"][i], batch["attention_mask"][i]
        on = (labels != IGNORE).nonzero().flatten().tolist()
        assert on, s.id
        # one contiguous run that ends at the last real token, labels == the input ids there
        last_real = int(mask.nonzero().max())
        assert on == list(range(on[0], last_real + 1)), s.id
        assert torch.equal(labels[on], ids[on])
        assert tok.decode(labels[on]) == s.answer + "<|im_end|>\n"
        assert tok.decode(ids[: on[0]]).endswith("<|im_start|>assistant\n")
        # image tokens, prompt and padding are all masked
        assert mask[last_real + 1:].eq(0).all()
    # the clock answers ("5:15"-like) take several tokens: the run is not just the first one
    assert max(int((batch["labels"][i] != IGNORE).sum()) for i in range(4)) > 3


# Parameters no forward pass uses: LLaVA and LLaVA-OneVision take the vision features from
# hidden_states[vision_feature_layer] (-1 here, -2 in the real checkpoints), before the CLIP/SigLIP
# post_layernorm, so it never gets a gradient although the `vision` and `full` recipes unfreeze it.
DEAD = {
    "llava": {"model.vision_tower.post_layernorm.weight", "model.vision_tower.post_layernorm.bias"},
    "llava_onevision": {"model.vision_tower.post_layernorm.weight", "model.vision_tower.post_layernorm.bias"},
}


def _step(model, batch):
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    loss = model(**batch).loss
    assert torch.isfinite(loss)
    loss.backward()
    opt.step()
    return loss


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("family", FAMS)
@pytest.mark.parametrize("recipe", RECIPE_NAMES)
def test_one_step_moves_exactly_the_trainable_parameters(tiny_copy, train_batch, oracle, family, recipe):
    """weight_decay=0 so that a tensor can only move through its gradient."""
    loaded = tiny_copy(family)
    batch, _ = train_batch(family)
    before = _snapshot(loaded.model)
    model, res = recipes.apply(loaded.model, loaded.family, recipe)
    expected = oracle.expected_names(recipe, family, before)
    if res.lora_targets:
        _check_lora_step(model, before, batch, oracle, family, recipe, expected)
        return
    assert model is loaded.model
    assert {n for n, p in model.named_parameters() if p.requires_grad} == expected
    _step(model, batch)
    after = dict(model.named_parameters())
    unchanged_trainable = {n for n in expected if torch.equal(after[n], before[n])}
    moved_frozen = [n for n in before if n not in expected and not torch.equal(after[n], before[n])]
    assert not moved_frozen
    assert all(after[n].grad is None for n in before if n not in expected)
    assert unchanged_trainable == expected & DEAD.get(family, set())
    assert all(after[n].grad is None for n in unchanged_trainable)


def _base_name(peft_name: str) -> str:
    return peft_name.removeprefix("base_model.model.").replace(".base_layer.", ".")


def _check_lora_step(model, before, batch, oracle, family, recipe, expected_base):
    named = dict(model.named_parameters())
    lora = {n: p for n, p in named.items() if ".lora_" in n}
    base = {_base_name(n): p for n, p in named.items() if ".lora_" not in n}
    assert set(base) == set(before)  # peft kept every base parameter, nothing else appeared
    assert {n for n, p in base.items() if p.requires_grad} == expected_base
    assert all(p.requires_grad for p in lora.values())
    modules = {_base_name(n).split(".lora_")[0] for n in lora}
    want = set(oracle.lora_modules(recipe, family, before.items()))
    assert modules == want
    assert all(m.startswith("model.language_model.layers.") for m in modules)
    assert not any(oracle.is_vision(family, m + ".weight") or oracle.is_projector(family, m + ".weight") for m in modules)
    b_before = {n: p.detach().clone() for n, p in lora.items() if ".lora_B." in n}
    assert b_before and all(t.eq(0).all() for t in b_before.values())  # lora_B starts at zero
    _step(model, batch)
    moved_base = [n for n, p in base.items() if n not in expected_base and not torch.equal(p, before[n])]
    assert not moved_base
    still_zero = [n for n, t in b_before.items() if torch.equal(lora[n], t)]
    assert not still_zero


@pytest.mark.parametrize("family", FAMS)
def test_lora_on_attention_roles_skips_vision_q_k_v(tiny_copy, oracle, family):
    """SigLIP/CLIP/InternViT have q/k/v_proj too: peft suffix matching would adapt them."""
    loaded = tiny_copy(family)
    names = dict(loaded.model.named_parameters())
    spec = RecipeSpec.from_dict("lora_attn", {"lora": {"roles": ["llm.attn.*"], "rank": 4}})
    model, res = recipes.apply(loaded.model, loaded.family, spec)
    want = {n[: -len(".weight")] for n in names if n.endswith(".weight") and oracle.role(family, n).startswith("llm.attn.")}
    assert set(res.lora_targets) == want
    got = {_base_name(n).split(".lora_")[0] for n, _ in model.named_parameters() if ".lora_A." in n}
    assert got == want
    assert res.trainable == sum(4 * sum(names[m + ".weight"].shape) for m in want)
    assert not res.names


def test_lora_recipe_with_extra_roles_also_unfreezes_them(tiny_copy, oracle):
    loaded = tiny_copy("llava")
    spec = RecipeSpec.from_dict("lora_norm", {"roles": ["llm.norm"], "lora": {"roles": ["llm.mlp.down"], "rank": 2}})
    model, res = recipes.apply(loaded.model, loaded.family, spec)
    trainable = {_base_name(n) for n, p in model.named_parameters() if p.requires_grad and ".lora_" not in n}
    assert trainable == {n for n in res.names} and trainable
    assert all(oracle.role("llava", n) == "llm.norm" for n in trainable)


# ---------------------------------------------------------------------------------------------
# 4. layer restrictions and patterns


def _names(tiny, family, spec):
    loaded = tiny(family)
    return set(recipes.resolve(loaded.model, loaded.family, spec).names)


def _attn_in_layers(tiny, oracle, family, layers):
    return {
        n for n, _ in tiny(family).model.named_parameters()
        if oracle.role(family, n).startswith("llm.attn.") and oracle.layer(n) in layers
    }


@pytest.mark.parametrize("family", FAMS)
def test_layers_and_last_n_select_exactly_those_layers(tiny, oracle, family):
    spec = RecipeSpec.from_dict("x", {"roles": ["llm.attn.*"], "layers": "1-2"})
    assert _names(tiny, family, spec) == _attn_in_layers(tiny, oracle, family, {1, 2})
    spec = RecipeSpec.from_dict("x", {"roles": ["llm.attn.*"], "last_n": 1})
    assert _names(tiny, family, spec) == _attn_in_layers(tiny, oracle, family, {3})
    spec = RecipeSpec.from_dict("x", {"roles": ["llm.attn.*"], "layers": "0,3"})
    assert _names(tiny, family, spec) == _attn_in_layers(tiny, oracle, family, {0, 3})


def test_layer_restriction_drops_llm_non_layer_params_but_keeps_vision(tiny, oracle):
    family = "qwen2_5_vl"
    got = _names(tiny, family, RecipeSpec.from_dict("x", {"roles": ["llm.*", "vision"], "layers": "2"}))
    names = [n for n, _ in tiny(family).model.named_parameters()]
    want = {n for n in names if oracle.layer(n) == 2} | {n for n in names if oracle.is_vision(family, n)}
    assert got == want


@pytest.mark.parametrize(
    "options, message",
    [
        ({"layers": "3-9"}, r"recipe 'x'.*'3-9'.*qwen2_5_vl has 4 LLM layers.*0-3"),
        ({"layers": "2-1"}, r"recipe 'x'.*'2-1'.*qwen2_5_vl.*0-3"),
        ({"layers": "first"}, r"recipe 'x'.*'first'"),
        ({"last_n": 5}, r"recipe 'x'.*last_n=5.*qwen2_5_vl has 4 LLM layers"),
        ({"last_n": 0}, r"recipe 'x'.*last_n=0.*qwen2_5_vl"),
    ],
)
def test_layer_ranges_outside_the_model_raise(tiny, options, message):
    spec = RecipeSpec.from_dict("x", {"roles": ["llm.attn.*"], **options})
    with pytest.raises(RecipeError, match=message):
        _names(tiny, "qwen2_5_vl", spec)


@pytest.mark.parametrize("family", FAMS)
def test_patterns_are_fullmatched_regexes(tiny, oracle, family):
    names = [n for n, _ in tiny(family).model.named_parameters()]
    pat = r"model\.language_model\.layers\.[02]\.mlp\.down_proj\.weight"
    got = _names(tiny, family, RecipeSpec.from_dict("p", {"patterns": [pat]}))
    assert got == {f"model.language_model.layers.{i}.mlp.down_proj.weight" for i in (0, 2)}
    # patterns add to roles
    got = _names(tiny, family, RecipeSpec.from_dict("p", {"roles": ["llm.head"], "patterns": pat}))
    assert got == {"lm_head.weight"} | {f"model.language_model.layers.{i}.mlp.down_proj.weight" for i in (0, 2)}
    # anchored at both ends: a prefix or a suffix alone matches nothing
    for partial in (r"model\.language_model\.layers\.0\.mlp", r"q_proj\.weight", r"lm_head"):
        with pytest.raises(RecipeError, match=rf"recipe 'p' matches no parameter of family '{family}'"):
            _names(tiny, family, RecipeSpec.from_dict("p", {"patterns": [partial]}))
    # a vision pattern reaches the vision tower (the user asked for it explicitly)
    vis = r"model\.visual\.blocks\.0\..+" if family == "qwen2_5_vl" else r"model\.vision_tower\..+"
    got = _names(tiny, family, RecipeSpec.from_dict("p", {"patterns": [vis]}))
    assert got and all(oracle.is_vision(family, n) for n in got)


def test_invalid_pattern_is_refused():
    with pytest.raises(RecipeError, match=r"recipe 'p': pattern '\(' is not a valid regex"):
        RecipeSpec.from_dict("p", {"patterns": ["("]})


# ---------------------------------------------------------------------------------------------
# 5. errors name the recipe, the family and the valid choices


def test_unknown_recipe_suggests_the_closest(tiny):
    loaded = tiny("qwen2_5_vl")
    # RECIPES.get raises registry.UnknownName (a KeyError), not RecipeError, when no custom recipes are given
    with pytest.raises((RecipeError, UnknownName)) as e:
        recipes.resolve(loaded.model, loaded.family, "sa_prj")
    msg = str(e.value)
    assert "'sa_prj'" in msg and "Did you mean 'sa_proj'?" in msg
    assert all(r in msg for r in RECIPE_NAMES)
    custom = {"mine": RecipeSpec.from_dict("mine", {"roles": ["llm.head"]})}
    with pytest.raises(RecipeError, match=r"unknown recipe 'mien'\. Did you mean 'mine'\?.*Valid choices: .*mine.*sa_proj"):
        recipes.resolve(loaded.model, loaded.family, "mien", custom)
    assert recipes.resolve(loaded.model, loaded.family, "mine", custom).names == ["lm_head.weight"]


def test_unknown_recipe_is_a_recipe_error_with_or_without_custom_recipes(tiny):
    loaded = tiny("qwen2_5_vl")
    with pytest.raises(RecipeError, match="Did you mean 'sa_proj'"):
        recipes.resolve(loaded.model, loaded.family, "sa_prj")


def test_unknown_role_names_recipe_family_and_roles(tiny):
    loaded = tiny("internvl")
    spec = RecipeSpec.from_dict("typo", {"roles": ["llm.atn.q"]})
    with pytest.raises(RecipeError) as e:
        recipes.resolve(loaded.model, loaded.family, spec)
    msg = str(e.value)
    for part in ("'typo'", "'internvl'", "'llm.atn.q'", "Did you mean 'llm.attn.q'?", "Valid roles:", "llm.mlp.down", "projector"):
        assert part in msg, (part, msg)


@pytest.mark.parametrize("family", FAMS)
def test_a_role_the_family_cannot_express_is_an_error(tiny, family):
    loaded = tiny(family)
    fam = loaded.family
    without = dataclasses.replace(fam, roles={k: v for k, v in fam.roles.items() if k != "projector"})
    with pytest.raises(RecipeError) as e:
        recipes.resolve(loaded.model, without, "projector")
    msg = str(e.value)
    assert "'projector'" in msg and f"'{family}'" in msg and "cannot express" in msg and "llm.attn.q" in msg
    # a role whose regexes match nothing in this model
    nowhere = dataclasses.replace(fam, roles={**fam.roles, "vision": [r"model\.no_such_tower\..+"]})
    with pytest.raises(RecipeError, match=rf"recipe 'vision': role 'vision' matches no parameter of family '{family}'"):
        recipes.resolve(loaded.model, nowhere, "vision")
    # a glob that only reaches empty roles: nothing to train, an error not a no-op
    spec = RecipeSpec.from_dict("vis", {"roles": ["visio*"]})
    with pytest.raises(RecipeError, match=rf"recipe 'vis' matches no parameter of family '{family}'.*Valid roles: llm"):
        recipes.resolve(loaded.model, nowhere, spec)


def test_a_recipe_matching_nothing_is_an_error(tiny):
    loaded = tiny("llava")
    spec = RecipeSpec.from_dict("ghost", {"patterns": [r"model\.nothing\..+"]})
    with pytest.raises(RecipeError, match=r"recipe 'ghost' matches no parameter of family 'llava'.*Valid roles: llm\.attn\.q"):
        recipes.apply(loaded.model, loaded.family, spec)
    # and nothing was frozen by the failed apply
    assert all(p.requires_grad for p in loaded.model.parameters())


@pytest.mark.parametrize(
    "d, message",
    [
        ({"roles": ["llm.head"], "layer": "1-2"}, r"recipe 'x': unknown key 'layer'\. Did you mean 'layers'\?.*Valid keys: .*last_n"),
        ({"role": ["llm.head"]}, r"recipe 'x': unknown key 'role'\. Did you mean 'roles'\?"),
        ({"roles": ["llm.head"], "layers": "1", "last_n": 1}, r"recipe 'x': give either 'layers' or 'last_n'"),
        ({"lora": {"rnk": 4}}, r"recipe 'x': unknown lora key\(s\) \['rnk'\]; valid: roles, rank"),
        ({"description": "nothing"}, r"recipe 'x': names no 'roles', 'patterns' or 'lora'"),
        (["llm.head"], r"recipe 'x': expected a mapping"),
    ],
)
def test_bad_recipe_dicts_are_refused(d, message):
    with pytest.raises(RecipeError, match=message):
        RecipeSpec.from_dict("x", d)


def test_from_dict_normalises_strings_to_tuples():
    spec = RecipeSpec.from_dict("x", {"roles": "llm.head", "patterns": r"lm_head\.weight", "layers": 3,
                                      "lora": {"roles": "llm.mlp.up", "rank": 2}})
    assert spec.roles == ("llm.head",) and spec.patterns == (r"lm_head\.weight",) and spec.layers == "3"
    assert spec.lora.roles == ("llm.mlp.up",) and spec.lora.rank == 2
    assert spec.with_options(lora_rank=16).lora.rank == 16
    assert spec.with_options(layers="0-1").layers == "0-1"


def test_recipe_file(tmp_path, tiny, oracle):
    f = tmp_path / "mine.yaml"
    f.write_text("head_only:\n  roles: [llm.head]\nlate_mlp:\n  roles: ['llm.mlp.*']\n  last_n: 2\n")
    custom = recipes.load_recipe_file(f)
    assert set(custom) == {"head_only", "late_mlp"}
    loaded = tiny("llava_onevision")
    got = set(recipes.resolve(loaded.model, loaded.family, "late_mlp", custom).names)
    names = [n for n, _ in loaded.model.named_parameters()]
    assert got == {n for n in names if oracle.role("llava_onevision", n).startswith("llm.mlp.") and oracle.layer(n) in (2, 3)}
    with pytest.raises(RecipeError, match="does not exist"):
        recipes.load_recipe_file(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("bad:\n  roles: [llm.head]\n  lr: 0.1\n")
    with pytest.raises(RecipeError, match=r"recipe 'bad': unknown key 'lr'"):
        recipes.load_recipe_file(tmp_path / "bad.yaml")


# ---------------------------------------------------------------------------------------------
# audit and the meta device


@pytest.mark.parametrize("family", FAMS)
def test_audit_on_a_meta_model_matches_the_real_model(tiny, family):
    from lmm_ray import models

    loaded = tiny(family)
    meta = models.meta_model(loaded.family, loaded.model.config)
    assert all(p.is_meta for p in meta.parameters())
    assert recipes.audit(meta, loaded.family) == recipes.audit(loaded.model, loaded.family)


@pytest.mark.parametrize("recipe", RECIPE_NAMES)
def test_to_dict_round_trips(recipe):
    spec = RECIPES.get(recipe)
    assert RecipeSpec.from_dict(recipe, spec.to_dict()) == spec
