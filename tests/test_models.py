"""models: save -> load round trips (ours and transformers' Auto class), helpful errors offline,
and the weight-free config/meta model that offline validation uses."""

from __future__ import annotations

import pytest
import torch
import transformers

from lmm_ray import data, models, skills
from lmm_ray.families import FAMILIES

FAMS = FAMILIES.names()


@pytest.fixture(scope="module")
def saved(tiny, tmp_path_factory):
    """`saved(family)` -> a folder written by `Loaded.save` from the session's tiny model."""
    cache = {}

    def get(family):
        if family not in cache:
            path = tmp_path_factory.mktemp(f"saved_{family}")
            tiny(family).save(path)
            cache[family] = path
        return cache[family]

    return get


def _assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    different = [k for k in sa if sa[k].dtype != sb[k].dtype or not torch.equal(sa[k], sb[k])]
    assert not different


def _samples():
    return skills.generate("color", 1, seed=3) + skills.generate("clock", 1, seed=3)


@pytest.mark.parametrize("family", FAMS)
def test_saved_tiny_model_loads_back_identically(tiny, saved, family):
    orig = tiny(family)
    path = saved(family)
    assert (path / "config.json").is_file() and (path / "model.safetensors").is_file()
    back = models.load_model(str(path))

    assert type(back.model) is type(orig.model) is orig.family.model_class
    assert back.family.name == family and back.ref == str(path)
    _assert_same_state(orig.model, back.model)
    # InternVL ties embeddings by default: the saved config must keep them apart
    assert back.model.config.tie_word_embeddings is False
    assert back.model.lm_head.weight.data_ptr() != back.model.get_input_embeddings().weight.data_ptr()
    assert back.model.generation_config.pad_token_id == orig.tokenizer.pad_token_id

    assert isinstance(back.processor, orig.family.processor_class)
    assert type(back.processor).__name__ == type(orig.processor).__name__
    assert "video_processor" not in back.processor.get_attributes()
    assert back.tokenizer.get_vocab() == orig.tokenizer.get_vocab()
    # (the order of all_special_tokens changes on reload; the set and the named ones must not)
    assert sorted(back.tokenizer.all_special_tokens) == sorted(orig.tokenizer.all_special_tokens)
    for attr, token in orig.family.tokenizer_specials.items():
        assert getattr(back.tokenizer, attr) == getattr(orig.tokenizer, attr) == token
        assert getattr(back.tokenizer, attr + "_id") == getattr(orig.tokenizer, attr + "_id")
    assert back.tokenizer.pad_token_id == orig.tokenizer.pad_token_id and back.tokenizer.eos_token == "<|im_end|>"
    assert back.processor.chat_template == orig.processor.chat_template


@pytest.mark.parametrize("family", FAMS)
def test_saved_processor_gives_identical_inputs(tiny, saved, family):
    orig = tiny(family)
    back = models.load_model(str(saved(family)))
    ea, eb = data.encode_train(orig.processor, _samples()), data.encode_train(back.processor, _samples())
    for a, b in zip(ea, eb):
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), k
    batch = data.collate(eb, back.tokenizer.pad_token_id)
    with torch.no_grad():
        assert torch.isfinite(back.model(**batch).loss)


@pytest.mark.parametrize("family", FAMS)
def test_saved_tiny_model_loads_with_transformers_auto_class(tiny, saved, family):
    orig = tiny(family).model
    auto = transformers.AutoModelForImageTextToText.from_pretrained(saved(family))
    assert type(auto) is type(orig)
    _assert_same_state(orig, auto)


@pytest.mark.parametrize("family", FAMS)
def test_model_config_and_meta_model_match_the_real_model(tiny, saved, family):
    real = {n: tuple(p.shape) for n, p in tiny(family).model.named_parameters()}
    for ref in (f"tiny:{family}", str(saved(family))):
        fam, cfg = models.model_config(ref)
        assert fam.name == family
        meta = models.meta_model(fam, cfg)
        assert all(p.is_meta for p in meta.parameters())
        assert {n: tuple(p.shape) for n, p in meta.named_parameters()} == real, ref


def test_load_model_tiny_ref():
    loaded = models.load_model("tiny:internvl")
    assert loaded.ref == "tiny:internvl" and loaded.family.name == "internvl"
    assert isinstance(loaded.model, transformers.InternVLForConditionalGeneration)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("ref", ["not/a/real/path-or-hub-id", "nobody-xyz/no-such-tiny-model"])
def test_load_model_of_a_missing_ref_is_a_helpful_error(monkeypatch, ref):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads the variable once at import; without this a hub id retries for ~25 s
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError) as e:
        models.load_model(ref)
    msg = str(e.value)
    assert repr(ref) in msg and "not a local folder" in msg and "hub id" in msg
    assert "tiny:<family>" in msg and "save_pretrained" in msg


def test_load_model_of_a_folder_without_config_is_a_helpful_error(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="a local folder without config.json"):
        models.load_model(str(tmp_path))


def test_load_model_of_an_unsupported_model_type_names_the_families(tmp_path):
    transformers.AutoConfig.for_model("gpt2", n_layer=1, n_embd=8, n_head=2).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"'gpt2' is not a supported family; supported: .*internvl"):
        models.load_model(str(tmp_path))


@pytest.mark.parametrize("family", FAMS)
def test_image_only_processor_has_no_video_processor(tiny, family):
    proc = tiny(family).processor
    assert "video_processor" not in proc.get_attributes()
    assert proc.tokenizer.chat_template and proc.chat_template == proc.tokenizer.chat_template
