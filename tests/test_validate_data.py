"""`lmm-ray validate` opens the data sources before Ray starts: a bad file, record, image, config,
split or column map exits 2 with the source's field in the sweep file; what it could not check
(hub datasets without --check-data, offline) is listed in the plan."""

from __future__ import annotations

import io
import json
from pathlib import Path
from types import SimpleNamespace

import datasets
import pytest
import yaml
from PIL import Image

from lmm_ray import cli, config, validate
from lmm_ray.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "sweeps" / "smoke.yaml"
SPACE = ROOT / "search_spaces" / "study_recipes.yaml"


@pytest.fixture(autouse=True)
def no_ray(monkeypatch):
    import ray

    def refuse(*a, **k):
        raise AssertionError("ray.init was called: validation must fail before Ray starts")

    was = ray.is_initialized()  # (a session-wide Ray of other tests may be up)
    monkeypatch.setattr(ray, "init", refuse)
    yield
    assert ray.is_initialized() == was


def _png_bytes(color=(10, 20, 30), size=(20, 12)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


def _records(n, n_images=4):
    return [{"id": f"r{i}", "image": f"{i % n_images}.png",
             "conversations": [{"from": "human", "value": f"<image>\nhow many {i}?"}, {"from": "gpt", "value": str(i % 5)}]}
            for i in range(n)]


@pytest.fixture
def files(tmp_path):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for k in range(4):
        (imgs / f"{k}.png").write_bytes(_png_bytes((40 * k, 9, 9)))
    (tmp_path / "train.json").write_text(json.dumps(_records(100)))
    (tmp_path / "test.json").write_text(json.dumps(_records(10)))
    return tmp_path


@pytest.fixture(scope="module")
def hubish(tmp_path_factory):
    """A local folder laid out like a hub repo with two configs (A, B), split `test`."""
    root = tmp_path_factory.mktemp("hubish") / "ds"
    feats = datasets.Features({"image": datasets.Image(), "question": datasets.Value("string"),
                               "answer": datasets.Value("string")})
    for name, n in (("A", 5), ("B", 3)):
        (root / name).mkdir(parents=True)
        rows = {"image": [{"bytes": _png_bytes(), "path": None}] * n, "question": ["q?"] * n, "answer": ["yes"] * n}
        datasets.Dataset.from_dict(rows, features=feats).to_parquet(str(root / name / "test-00000.parquet"))
    (root / "README.md").write_text("---\nconfigs:\n" + "".join(
        f"- config_name: {c}\n  data_files:\n  - split: test\n    path: {c}/test-*\n" for c in "AB") + "---\n")
    return root


def _sweep(tmp_path, stage=None, heldout=None) -> Path:
    raw = yaml.safe_load(SMOKE.read_text())
    raw["search_space"], raw["storage"] = str(SPACE), str(tmp_path / "runs")
    if stage is not None:
        raw["stages"][0] = {"name": "mine", "data": stage, "eval_data": {
            "llava_json": str(tmp_path / "test.json"), "image_folder": str(tmp_path / "imgs")}, "steps": 5}
    if heldout is not None:
        raw["heldout"].append({"name": "extra", "data": heldout})  # heldout.3
    p = tmp_path / "sweep.yaml"
    p.write_text(yaml.safe_dump(raw, sort_keys=False))
    return p


def _validate(capsys, path, *args) -> tuple[int, str, str]:
    rc = cli.main(["validate", str(path), *args])
    out, err = capsys.readouterr()
    return rc, out, err


def _llava(files, name="train.json"):
    return {"llava_json": str(files / name), "image_folder": str(files / "imgs")}


def _refused(capsys, path, *expect, args=()):
    rc, out, err = _validate(capsys, path, *args)
    assert rc == 2, (out, err)
    assert "Traceback" not in err and "fix:" in err, err
    for text in expect:
        assert text in err, f"{text!r} not in:\n{err}"


def test_a_good_local_source_passes_and_hub_sources_are_listed_unchecked(capsys, files):
    path = _sweep(files, stage=_llava(files), heldout={"hf": "someone/remote-set", "split": "test"})
    rc, out, err = _validate(capsys, path)
    assert rc == 0, err
    assert "unchecked  heldout.3.data: hub dataset someone/remote-set (schema not read: validate with --check-data)" in out
    rc, out, err = _validate(capsys, path, "--offline")
    assert rc == 0 and "unchecked  heldout.3.data: hub dataset someone/remote-set (offline)" in out, err


def test_empty_file_is_refused(capsys, files):
    (files / "train.json").write_text("[]")
    _refused(capsys, _sweep(files, stage=_llava(files)), "stages.0.data.llava_json", "has no records")


def test_malformed_record_is_refused(capsys, files):
    recs = _records(100)
    del recs[63]["conversations"]
    (files / "train.json").write_text(json.dumps(recs))
    _refused(capsys, _sweep(files, stage=_llava(files)), "stages.0.data.llava_json", "record 63 (id 'r63')",
             "field 'conversations'")


def test_missing_image_deep_in_the_file_is_refused(capsys, files):
    recs = _records(100)
    recs[57]["image"] = "nope/57.png"  # not one of the 32 decoded: found by the existence check of every record
    (files / "train.json").write_text(json.dumps(recs))
    _refused(capsys, _sweep(files, stage=_llava(files)), "stages.0.data.image_folder", "record 57", "image not found",
             "nope/57.png")


def test_undecodable_image_is_refused(capsys, files):
    (files / "imgs" / "0.png").write_bytes(b"not an image")
    _refused(capsys, _sweep(files, stage=_llava(files)), "stages.0.data.image_folder", "cannot read")


def test_missing_config_is_refused(capsys, files, hubish):
    _refused(capsys, _sweep(files, heldout={"hf": str(hubish), "split": "test"}), "heldout.3.data.config",
             "several configs", "['A', 'B']")
    _refused(capsys, _sweep(files, heldout={"hf": str(hubish), "split": "test", "config": "C"}),
             "heldout.3.data.config", "config 'C' not found")


def test_wrong_split_is_refused(capsys, files, hubish):
    _refused(capsys, _sweep(files, heldout={"hf": str(hubish), "config": "A", "split": "train"}),
             "heldout.3.data.split", "train")


def test_column_map_naming_a_missing_column_is_refused(capsys, files, hubish):
    src = {"hf": str(hubish), "config": "A", "split": "test", "columns": {"answer": "label"}}
    _refused(capsys, _sweep(files, heldout=src), "heldout.3.data.columns.answer", "column 'label'",
             "['image', 'question', 'answer']")
    src = {"hf": str(hubish), "config": "A", "split": "test", "filter": {"kind": "x"}}
    _refused(capsys, _sweep(files, heldout=src), "heldout.3.data.filter.kind", "column 'kind'")


def test_a_good_local_hf_copy_passes(capsys, files, hubish):
    rc, out, err = _validate(capsys, _sweep(files, heldout={"hf": str(hubish), "config": "B", "split": "test"}))
    assert rc == 0, err
    assert "unchecked" not in out


def test_benchmark_copy_that_lacks_a_preset_column_names_its_path(capsys, files, hubish):
    # ai2d's preset maps choices to `options`; this copy has no such column.
    src = {"benchmark": "ai2d", "path": str(hubish / "A"), "split": "test"}
    (hubish / "A" / "test-00000.parquet").rename(hubish / "A" / "test.parquet")
    try:
        _refused(capsys, _sweep(files, heldout=src), "heldout.3.data.path", "column 'options'", "for field 'choices'")
    finally:
        (hubish / "A" / "test.parquet").rename(hubish / "A" / "test-00000.parquet")


def _fake_builder(features, splits=("test",)):
    info = SimpleNamespace(features=datasets.Features(features) if features else None,
                           splits={s: None for s in splits})
    return lambda *a, **k: SimpleNamespace(info=info)


def test_check_data_reads_hub_schemas(files, monkeypatch):
    feats = {"img": datasets.Image(), "question": datasets.Value("string"), "answer": datasets.Value("string")}
    monkeypatch.setattr(datasets, "load_dataset_builder", _fake_builder(feats))
    cfg = config.load_sweep(_sweep(files, heldout={"hf": "someone/remote-set", "split": "test"}))
    with pytest.raises(ConfigError) as e:  # the default image column is `image`; this set calls it `img`
        validate.check_data_sources(cfg, hub=True)
    assert e.value.field == "heldout.3.data.columns.image" and "column 'image'" in str(e.value)
    cfg = config.load_sweep(_sweep(files, heldout={"hf": "someone/remote-set", "split": "val", "columns": {"image": "img"}}))
    with pytest.raises(ConfigError) as e:
        validate.check_data_sources(cfg, hub=True)
    assert e.value.field == "heldout.3.data.split" and "no split 'val'" in str(e.value)
    cfg = config.load_sweep(_sweep(files, heldout={"hf": "someone/remote-set", "split": "test", "columns": {"image": "img"}}))
    assert validate.check_data_sources(cfg, hub=True) == []
    assert validate.check_data_sources(cfg, hub=True, offline=True) == [
        "heldout.3.data: hub dataset someone/remote-set (offline)"]
    monkeypatch.setattr(datasets, "load_dataset_builder", _fake_builder(None))
    assert "publishes no schema" in validate.check_data_sources(cfg, hub=True)[0]


def test_unreachable_hub_is_tried_once_and_listed(files, monkeypatch):
    calls = []

    def unreachable(*a, **k):
        calls.append(a)
        raise ConnectionError("Couldn't reach 'x' on the Hub")

    monkeypatch.setattr(datasets, "load_dataset_builder", unreachable)
    raw_path = _sweep(files, heldout={"hf": "someone/one", "split": "test"})
    raw = yaml.safe_load(raw_path.read_text())
    raw["heldout"].append({"name": "extra2", "data": {"hf": "someone/two", "split": "test"}})
    raw_path.write_text(yaml.safe_dump(raw))
    got = validate.check_data_sources(config.load_sweep(raw_path), hub=True)
    assert len(calls) == 1 and "unreachable" in got[0] and got[1] == "heldout.4.data: hub dataset someone/two (hub unreachable)"


def test_a_hub_config_error_names_the_config_field(files, monkeypatch):
    def missing(*a, **k):
        raise ValueError("Config name is missing.\nPlease pick one among the available configs: ['DocVQA', 'InfographicVQA']")

    monkeypatch.setattr(datasets, "load_dataset_builder", missing)
    cfg = config.load_sweep(_sweep(files, heldout={"hf": "lmms-lab/DocVQA", "split": "validation"}))
    with pytest.raises(ConfigError) as e:
        validate.check_data_sources(cfg, hub=True)
    assert e.value.field == "heldout.3.data.config" and "['DocVQA', 'InfographicVQA']" in str(e.value)
