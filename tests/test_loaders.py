"""Loaders: LLaVA JSON/JSONL, the study's dataset YAML, Hugging Face datasets, and bad input."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from lmm_ray.skills.loaders import (
    DataError,
    apply_sampling,
    load_dataset_yaml,
    load_hf_dataset,
    load_llava_json,
    clean_question,
    load_samples,
    parse_choices,
    parse_sampling,
)

CUB_Q = ("<image>\nWhat bird is this?\nAnswer with the option's letter from the given choices directly.\n"
         "A. Black footed Albatross\nB. Laysan Albatross\nC. Sooty Albatross")


def _png(folder, name, color, size=(8, 6)):
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.new("RGB", size, color)
    img.putpixel((1, 2), (255 - color[0], 7, 9))  # not a flat image, so pixel equality means something
    img.save(path)
    return img


def _rec(i, image, question, answer):
    return {"id": f"r{i}", "image": image,
            "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]}


def _write(path, records, jsonl=False):
    path.write_text("\n".join(json.dumps(r) for r in records) if jsonl else json.dumps(records))
    return path


@pytest.fixture
def llava(tmp_path):
    """Five records covering every inferred answer type, images under tmp_path/imgs."""
    imgs = tmp_path / "imgs"
    cases = [
        ("What time does the clock show in this image?\n<image>", "3:45", "time"),
        ("How many dogs are in this image?\n<image>", "seven", "number"),
        ("<image>\nIs this tissue malignant?", "yes", "yesno"),
        (CUB_Q, "B", "choice"),
        ("<image>\nWhat brand is the can?", "coca cola", "word"),
    ]
    written, records = [], []
    for i, (q, a, _) in enumerate(cases):
        written.append(_png(imgs, f"sub/{i}.png", (40 * i, 100, 200)))
        records.append(_rec(i, f"sub/{i}.png", q, a))
    return imgs, records, written, [c[2] for c in cases]


@pytest.mark.parametrize("jsonl", [False, True])
def test_llava_round_trip(tmp_path, llava, jsonl):
    imgs, records, written, types = llava
    path = _write(tmp_path / ("d.jsonl" if jsonl else "d.json"), records, jsonl)
    samples = load_llava_json(path, imgs, skill="mixed")
    assert [s.question for s in samples] == [
        "What time does the clock show in this image?", "How many dogs are in this image?",
        "Is this tissue malignant?", CUB_Q.removeprefix("<image>\n"), "What brand is the can?"]
    assert [s.answer for s in samples] == ["3:45", "seven", "yes", "B", "coca cola"]
    assert [s.answer_type for s in samples] == types
    assert samples[3].choices == ("Black footed Albatross", "Laysan Albatross", "Sooty Albatross")
    assert all(s.choices == () for i, s in enumerate(samples) if i != 3)
    assert [s.id for s in samples] == [f"r{i}" for i in range(5)]
    assert all(s.skill == "mixed" for s in samples)
    for s, w in zip(samples, written):
        assert s.image.mode == "RGB" and s.image.size == w.size
        assert s.image.tobytes() == w.tobytes()


def test_explicit_answer_type_and_number_inference(tmp_path, llava):
    imgs, records, _, _ = llava
    records[4]["conversations"][1]["value"] = "12"
    path = _write(tmp_path / "d.json", records)
    assert load_llava_json(path, imgs)[4].answer_type == "number"
    assert {s.answer_type for s in load_llava_json(path, imgs, answer_type="word")} == {"word"}


def test_absolute_image_path_and_only_kept_images_opened(tmp_path, llava):
    imgs, records, _, _ = llava
    records[0]["image"] = str(imgs / "sub/0.png")  # absolute: used as it is
    records.append(_rec(5, "does-not-exist.png", "<image>\nq?", "a"))  # only reached if kept
    path = _write(tmp_path / "d.json", records)
    assert len(load_llava_json(path, tmp_path / "elsewhere", sampling="first:1")) == 1
    assert len(load_llava_json(path, imgs, sampling="first:5")) == 5
    with pytest.raises(DataError, match="record 5"):
        load_llava_json(path, imgs, sampling="end:1")


def test_question_helpers():
    assert clean_question("<image>\nWhat?") == clean_question("What?\n<image>") == "What?"
    assert clean_question("Look <image> here") == "Look  here"
    assert parse_choices("Q\nA. x\nB. y") == ("x", "y")
    assert parse_choices("Q\nA. x\nC. y") == ()  # letters must run A, B, ...
    assert parse_choices("Who wrote it?\nI. Asimov") == ()


# ---------------------------------------------------------------- sampling


@pytest.mark.parametrize("s, expected", [
    ("all", ("all", None, False)),
    ("first:3", ("first", 3, False)),
    ("end:10", ("end", 10, False)),
    ("random:7", ("random", 7, False)),
    ("random:10%", ("random", 10.0, True)),
    ("first:2.5%", ("first", 2.5, True)),
    ("end:100%", ("end", 100.0, True)),
    (" all ", ("all", None, False)),
])
def test_parse_sampling(s, expected):
    assert parse_sampling(s) == expected


@pytest.mark.parametrize("bad", ["frist:3", "random:", "first:-1", "random:150%", "first:0", "first:1.5",
                                 "random:0%", "first", "", "all:3", "first:10%-first:20%"])
def test_parse_sampling_rejects(bad):
    with pytest.raises(DataError) as e:
        parse_sampling(bad)
    assert repr(bad) in str(e.value) and "first:N" in str(e.value) and "random:P%" in str(e.value)


def test_apply_sampling():
    recs = list(range(10))
    assert apply_sampling(recs, "all") == recs
    assert apply_sampling(recs, "first:3") == [0, 1, 2]
    assert apply_sampling(recs, "end:3") == [7, 8, 9]
    assert apply_sampling(recs, "first:50") == recs
    assert apply_sampling(recs, "first:25%") == [0, 1, 2]  # 2.5 rounds up
    r = apply_sampling(recs, "random:4", seed=1)
    assert r == sorted(r) and len(set(r)) == 4
    assert r == apply_sampling(recs, "random:4", seed=1)
    assert any(apply_sampling(recs, "random:4", seed=s) != r for s in range(2, 6))


# ---------------------------------------------------------------- dataset YAML


def test_dataset_yaml(tmp_path):
    imgs = tmp_path / "imgs"
    for i in range(20):
        _png(imgs, f"{i}.png", (i * 10, 0, 0))
    (tmp_path / "data").mkdir()
    a = _write(tmp_path / "data" / "a.json", [_rec(i, f"{i}.png", "<image>\nHow many?", str(i)) for i in range(10)])
    _write(tmp_path / "data" / "b.json", [_rec(i, f"{i}.png", "<image>\nColour?", f"c{i}") for i in range(10, 20)])

    def load(sa, sb, seed=0):
        y = tmp_path / "data" / "mix.yaml"
        y.write_text(f"datasets:\n- json_path: {a}\n  sampling_strategy: \"{sa}\"\n"
                     f"- json_path: b.json\n  sampling_strategy: \"{sb}\"\n")  # b is relative to the YAML
        return [s.id for s in load_dataset_yaml(y, imgs, seed=seed)]

    assert load("first:3", "end:2") == ["r0", "r1", "r2", "r18", "r19"]
    ids = load("random:4", "random:30%", seed=3)
    assert len(ids) == 7 and ids[:4] == sorted(ids[:4], key=lambda x: int(x[1:]))
    assert all(int(i[1:]) < 10 for i in ids[:4]) and all(int(i[1:]) >= 10 for i in ids[4:])
    assert ids == load("random:4", "random:30%", seed=3)
    assert any(load("random:4", "random:30%", seed=s) != ids for s in range(4, 8))
    samples = load_samples({"dataset_yaml": str(tmp_path / "data" / "mix.yaml"), "image_folder": str(imgs)})
    assert samples[0].answer_type == "number" and samples[-1].answer_type == "word"


# ---------------------------------------------------------------- Hugging Face datasets


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    datasets = pytest.importorskip("datasets")
    imgs = [Image.new("RGB", (5, 4), (i * 50, 20, 30)) for i in range(4)]
    ds = datasets.Dataset.from_dict({
        "img": imgs,
        "q": ["<image>\nWhat does the sign say?", "What number is shown?", "Is it open?", "Which word?"],
        "answers": [["stop", "stop", "halt"], ["12", "12", "12"], ["no", "yes", "no"], ["go", "went"]],
        "qid": ["a", "b", "c", "d"],
    }, features=datasets.Features({"img": datasets.Image(), "q": datasets.Value("string"),
                                   "answers": datasets.Sequence(datasets.Value("string")),
                                   "qid": datasets.Value("string")}))
    path = tmp_path_factory.mktemp("hf") / "textvqa_mini"
    ds.save_to_disk(str(path))
    return path, imgs


HF_COLS = {"image": "img", "question": "q", "answer": "answers", "id": "qid"}


def test_hf_load_from_disk(hf_dir):
    path, imgs = hf_dir
    samples = load_hf_dataset(path, columns=HF_COLS, skill="ocr")
    assert [s.question for s in samples] == ["What does the sign say?", "What number is shown?", "Is it open?",
                                             "Which word?"]
    assert [s.answer for s in samples] == ["stop", "12", "no", "go"]  # most common; a tie takes the first
    assert [s.answer_type for s in samples] == ["word", "number", "yesno", "word"]
    assert [s.id for s in samples] == ["a", "b", "c", "d"] and samples[0].skill == "ocr"
    for s, w in zip(samples, imgs):
        assert s.image.tobytes() == w.tobytes()
    via = load_samples({"hf": str(path), "columns": HF_COLS, "n": 2})
    assert [s.id for s in via] == ["a", "b"]
    rnd = load_samples({"hf": str(path), "columns": HF_COLS, "n": "random:2"}, seed=5)
    assert len(rnd) == 2


def test_hf_choices_from_parquet(tmp_path):
    datasets = pytest.importorskip("datasets")
    import io

    buf = io.BytesIO()
    Image.new("RGB", (3, 3), (1, 2, 3)).save(buf, format="PNG")

    def parquet(name, answers, answer_feature):
        ds = datasets.Dataset.from_dict(
            {"image": [{"bytes": buf.getvalue(), "path": None}] * 2, "question": ["Which planet?", "Which gas?"],
             "options": [["Mars", "Venus"], ["O2", "N2", "CO2"]], "answer": answers},
            features=datasets.Features({"image": datasets.Image(), "question": datasets.Value("string"),
                                        "options": datasets.Sequence(datasets.Value("string")),
                                        "answer": answer_feature}))
        ds.to_parquet(str(tmp_path / name))
        return load_hf_dataset(tmp_path / name, columns={"choices": "options"})

    by_text = parquet("text.parquet", ["Venus", "CO2"], datasets.Value("string"))  # the option text itself
    by_index = parquet("index.parquet", [1, 2], datasets.Value("int64"))  # an index into the options
    for samples in (by_text, by_index):
        assert [s.answer_type for s in samples] == ["choice", "choice"]
        assert [s.answer for s in samples] == ["B", "C"] and samples[1].choices == ("O2", "N2", "CO2")
        assert samples[1].question == "Which gas?\nA. O2\nB. N2\nC. CO2"  # options shown, CUB style
        assert samples[0].image.getpixel((0, 0)) == (1, 2, 3)


def test_hf_missing_column(hf_dir):
    path, _ = hf_dir
    with pytest.raises(DataError) as e:
        load_hf_dataset(path, columns={"image": "img", "question": "question", "answer": "answers"})
    msg = str(e.value)
    assert "textvqa_mini" in msg and "'question'" in msg and "['img', 'q', 'answers', 'qid']" in msg


# ---------------------------------------------------------------- bad input


def _err(fn, *args, **kw) -> str:
    with pytest.raises(DataError) as e:
        fn(*args, **kw)
    return str(e.value)


def test_bad_files(tmp_path):
    assert "missing.json" in _err(load_llava_json, tmp_path / "missing.json", tmp_path)
    bad = tmp_path / "broken.json"
    bad.write_text('[\n  {"id": 1,\n  "image": }\n]')
    msg = _err(load_llava_json, bad, tmp_path)
    assert "broken.json" in msg and "line 3" in msg and "column" in msg
    badl = tmp_path / "broken.jsonl"
    badl.write_text(json.dumps(_rec(0, "x.png", "q", "a")) + "\n{oops\n")
    msg = _err(load_llava_json, badl, tmp_path)
    assert "broken.jsonl" in msg and "record 1" in msg and "line 2" in msg
    obj = _write(tmp_path / "obj.json", {"id": 1})
    assert "obj.json" in (msg := _err(load_llava_json, obj, tmp_path)) and "list" in msg


@pytest.mark.parametrize("mutate, field", [
    (lambda r: r.pop("conversations"), "'conversations'"),
    (lambda r: r.update(conversations=[{"from": "gpt", "value": "x"}]), "human"),
    (lambda r: r["conversations"].pop(), "gpt"),
    (lambda r: r["conversations"][1].update(value="  "), "conversations[1].value"),
    (lambda r: r.pop("image"), "'image'"),
    (lambda r: r["conversations"][1].update(value="Z"), "conversations[1].value"),  # letter past the options
])
def test_bad_records_fail_before_any_image_is_opened(tmp_path, mutate, field):
    recs = [_rec(i, f"{i}.png", CUB_Q, "A") for i in range(30)]  # no image exists: structure comes first
    mutate(recs[20])
    msg = _err(load_llava_json, _write(tmp_path / "set.json", recs), tmp_path, sampling="first:1")
    assert "set.json" in msg and "record 20" in msg and "'r20'" in msg and field in msg


def test_bad_images(tmp_path):
    _png(tmp_path, "ok.png", (1, 2, 3))
    (tmp_path / "junk.png").write_text("not an image")
    path = _write(tmp_path / "imgs.json", [_rec(0, "ok.png", "q?", "a"), _rec(1, "gone.png", "q?", "a"),
                                           _rec(2, "junk.png", "q?", "a")])
    msg = _err(load_llava_json, path, tmp_path, sampling="first:2")
    assert "imgs.json" in msg and "record 1" in msg and "'image'" in msg
    assert str(tmp_path / "gone.png") in msg and f"image_folder {tmp_path}" in msg
    msg = _err(load_llava_json, path, tmp_path, sampling="end:1")
    assert "imgs.json" in msg and "record 2" in msg and "junk.png" in msg and "as an image" in msg


def test_bad_sampling_and_yaml(tmp_path):
    path = _write(tmp_path / "d.json", [_rec(0, "x.png", "q?", "a")])
    msg = _err(load_llava_json, path, tmp_path, sampling="frist:3")
    assert "d.json" in msg and "'frist:3'" in msg and "random:N" in msg
    y = tmp_path / "mix.yaml"
    y.write_text("data:\n- json_path: d.json\n")
    assert "mix.yaml" in (msg := _err(load_dataset_yaml, y, tmp_path)) and "'datasets'" in msg
    y.write_text("datasets:\n- json_path: d.json\n- sampling_strategy: all\n")
    msg = _err(load_dataset_yaml, y, tmp_path)
    assert "mix.yaml" in msg and "datasets[1]" in msg and "'json_path'" in msg
    y.write_text("datasets:\n- json_path: d.json\n  sampling_strategy: first:x\n")
    msg = _err(load_dataset_yaml, y, tmp_path)
    assert "mix.yaml" in msg and "datasets[0]" in msg and "'first:x'" in msg


def test_load_samples_rejects_unknown_forms(tmp_path):
    assert "exactly one of" in _err(load_samples, {"json": "x"})
    assert "'sampling_strategy'" in _err(load_samples, {"llava_json": "x", "sampling_strategy": "all"})
