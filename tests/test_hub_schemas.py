"""The 13 study sets through their benchmark presets, on local copies whose features equal the
hub schemas (shared/research/real_path.md "Datasets"; hub dataset cards), laid out like the hub
repos (README `configs:` block, one folder per config, parquet shards), so that
`load_dataset(path, name=config, split=...)` reads them exactly as it reads the hub id."""

from __future__ import annotations

import pytest
from PIL import Image

datasets = pytest.importorskip("datasets")

from lmm_ray.skills import benchmarks  # noqa: E402
from lmm_ray.skills.loaders import (  # noqa: E402
    _SOURCE_FORMS,
    _SOURCE_OPTIONS,
    DataError,
    check_source,
    load_samples,
    parse_choices,
)
from lmm_ray.skills.schema import Sample  # noqa: E402

S, I8, I16, I32, I64 = (datasets.Value(t) for t in ("string", "int8", "int16", "int32", "int64"))
IMG = datasets.Image()


def L(f):
    return datasets.Sequence(f)


def F(**kw):
    return datasets.Features(kw)


# The hub schemas (dataset cards' dataset_info; real_path.md). Column order as on the cards.
HUB = {
    "ai2d": F(question=S, options=L(S), answer=S, image=IMG),
    "chartqa": F(type=S, question=S, answer=S, image=IMG),
    "docvqa": F(questionId=S, question=S, question_types=L(S), image=IMG, docId=I64, ucsf_document_id=S,
                ucsf_document_page_no=S, answers=L(S), data_split=S),
    "infovqa": F(questionId=S, question=S, answers=L(S), answer_type=L(S), image=IMG, image_url=S,
                 **{"operation/reasoning": L(S)}, ocr=S, data_split=S),
    "realworldqa": F(question=S, answer=S, image=IMG),
    "seedbench": F(answer=S, choice_a=S, choice_b=S, choice_c=S, choice_d=S, data_id=S, data_type=S, question=S,
                   question_id=S, question_type_id=I16, image=L(IMG)),
    "scienceqa": F(image=IMG, question=S, choices=L(S), answer=I8, hint=S, task=S, grade=S, subject=S, topic=S,
                   category=S, skill=S, lecture=S, solution=S),
    "mmstar": F(index=I64, question=S, image=IMG, answer=S, category=S, l2_category=S,
                meta_info={"source": S, "split": S, "image_path": S}),
    "cub200": F(question=S, answer=S, image=IMG),
    "pixmocount": F(question=S, answer=S, image=IMG),
    "pathvqa": F(image=IMG, question=S, answer=S),
    "textvqa": F(image_id=S, question_id=I32, question=S, question_tokens=L(S), image=IMG, image_width=I32,
                 image_height=I32, flickr_original_url=S, flickr_300k_url=S, answers=L(S), image_classes=L(S),
                 set_name=S, ocr_tokens=L(S)),
    "timeclock": F(question=S, answer=S, image=IMG),
}

MMSTAR_Q = ("Which option describe the object relationship in the image correctly?\nOptions: A: The suitcase is "
            "on the book., B: The suitcase is beneath the cat., C: The suitcase is beside the book., D: The "
            "suitcase is beneath the bed.")
RWQA_Q = ("Which object is closer to the camera?\nA. The car\nB. The tree\nC. The sign\nPlease answer directly "
          "with only the letter of the correct option and nothing else.")
CUB_Q = ("<image>\nWhat is the name of this bird?\nAnswer with the option's letter from the given choices "
         "directly.\nA. Black footed Albatross\nB. Laysan Albatross\nC. Sooty Albatross")
SQA_HINT = "Tree frogs live in rain forests. Their feet are adapted for sticking to smooth surfaces."
TEXTVQA_ANSWERS = ["nous les gosses", "dakota", "clos culombu", "dakota digital", "dakota", "dakota",
                   "dakota digital", "dakota digital", "dakota", "dakota"]
SEED = dict(choice_a="One", choice_b="Two", choice_c="Three", choice_d="Four")

# (repo, config, split) -> rows. `k` numbers the row's image (a distinct colour); a list `k`
# gives a list of images. Columns a row leaves out get a neutral value of their type.
ROWS = {
    ("ai2d", None, "test"): [
        dict(k=0, question="Which stage follows the larva?", options=["egg", "pupa", "adult", "larva"], answer="1"),
        dict(k=1, question="How many legs are labelled?", options=["1", "2", "3", "4"], answer="1"),
        dict(k=2, question="What does the arrow show?", options=["rain", "evaporation", "runoff"], answer="2"),
        dict(k=3, question="Which is a producer?", options=["grass", "hawk"], answer="0")],
    ("chartqa", None, "test"): [
        dict(k=4, type="human_test", question="What is the value of Japan in 2019?", answer="14"),
        dict(k=5, type="augmented_test", question="What is the difference between the bars?", answer="0.57"),
        dict(k=6, type="human_test", question="Is the line increasing?", answer="Yes")],
    ("docvqa", "DocVQA", "validation"): [
        dict(k=7, questionId="49153", question="What is the name of the company?", question_types=["layout"],
             docId=14465, answers=["Tobacco Institute", "The Tobacco Institute", "Tobacco Institute"], data_split="val"),
        dict(k=8, questionId="49154", question="What is the date?", answers=["May 1, 1974"], data_split="val")],
    ("docvqa", "DocVQA", "test"): [dict(k=9, questionId="1", question="Hidden answer?", answers=[], data_split="test")],
    ("docvqa", "InfographicVQA", "validation"): [
        dict(k=10, questionId="98313", question="What percentage of people use email?", answers=["46%", "46"],
             answer_type=["single span"], data_split="val"),
        dict(k=11, questionId="98314", question="Which country is shown?", answers=["France"], data_split="val")],
    ("realworldqa", None, "test"): [
        dict(k=12, question=RWQA_Q, answer="B"),
        dict(k=13, question="How many lanes does the road have? Please answer directly with a single word or "
                            "number.", answer="3")],
    ("seedbench", None, "test"): [
        dict(k=[14], question="How many towels are in the image?", answer="C", data_type="image", data_id="1454426_2591111986",
             question_id="101669", question_type_id=5, **SEED),
        dict(k=[15, 16, 17], question="What is the person doing?", answer="B", data_type="video", data_id="v1.mp4",
             question_id="2000", question_type_id=10, **SEED),
        dict(k=[18], question="What colour is the car?", answer="A", data_type="image", question_id="101670", **SEED),
        dict(k=[19], question="Where is the cat?", answer="D", data_type="image", question_id="101671", **SEED)],
    ("scienceqa", "ScienceQA-FULL", "test"): [
        dict(k=None, question="Which word would you find on a dictionary page?", choices=["cent", "crop"], answer=1),
        dict(k=23, question="Which is a solid?", choices=["milk", "rock"], answer=1)],
    ("scienceqa", "ScienceQA-IMG", "test"): [
        dict(k=20, question="Which of these states is farthest north?", choices=["West Virginia", "Louisiana",
             "Arizona", "Oklahoma"], answer=0, subject="social science"),
        dict(k=21, question="Which animal's feet are also adapted for sticking to smooth surfaces?",
             choices=["tokay gecko", "hippopotamus"], answer=0, hint=SQA_HINT, subject="natural science"),
        dict(k=22, question="Which material is this spoon made of?", choices=["rubber", "wood", "metal"], answer=2)],
    ("mmstar", None, "val"): [
        dict(k=24, index=0, question=MMSTAR_Q, answer="A", category="coarse perception",
             l2_category="image scene and topic", meta_info={"source": "MMBench", "split": "val", "image_path": "0.jpg"}),
        dict(k=25, index=1, question="How many apples are there?\nOptions: A: 3, B: 4, C: 5, D: 6", answer="B",
             category="fine-grained perception", l2_category="object counting")],
    ("cub200", None, "train"): [dict(k=26, question=CUB_Q, answer="B"),
                                dict(k=27, question=CUB_Q.replace("this bird", "the bird"), answer="C")],
    ("pixmocount", None, "train"): [dict(k=28, question="How many people are in this image?", answer="7")],
    ("pathvqa", None, "test"): [dict(k=29, question="Is there coagulative necrosis?", answer="yes"),
                                dict(k=30, question="What is present?", answer="coagulative necrosis")],
    ("pathvqa", None, "train"): [dict(k=31, question="Is this a carcinoma?", answer="no")],
    ("textvqa", None, "validation"): [
        dict(k=32, image_id="003a8ae2ef43b901", question_id=34602, question="what is the brand of this camera?",
             answers=TEXTVQA_ANSWERS, set_name="val"),
        dict(k=33, question_id=34603, question="what does the sign say?", answers=["stop"] * 10, set_name="val")],
    ("timeclock", None, "train"): [dict(k=34, question="What time does the clock show?", answer="3:45")],
}
REPO_OF = {"infovqa": "docvqa", "scienceqa_img": "scienceqa"}  # presets sharing a hub repo
HUB_ID_REPO = {"lmms-lab-encoder/ai2d": "ai2d", "lmms-lab-encoder/ChartQA": "chartqa",
               "lmms-lab-encoder/DocVQA": "docvqa", "lmms-lab-encoder/RealWorldQA": "realworldqa",
               "lmms-lab-encoder/SEED-Bench": "seedbench", "lmms-lab-encoder/ScienceQA": "scienceqa",
               "Lin-Chen/MMStar": "mmstar", "Jessemel/cub200-test": "cub200", "Jessemel/pixmocount-test": "pixmocount",
               "flaviagiammarino/path-vqa": "pathvqa", "lmms-lab-encoder/textvqa": "textvqa",
               "AvaXiao/clockreading-time": "timeclock"}


def colour(k: int) -> tuple[int, int, int]:
    return (7 * k % 256, 90 + k, 160)


def _neutral(feat):
    if isinstance(feat, dict):
        return {n: _neutral(f) for n, f in feat.items()}
    if isinstance(feat, datasets.Value):
        return "" if feat.dtype == "string" else 0
    return []


def _table(feats, rows):
    def image(k):
        if k is None:
            return None
        return [Image.new("RGB", (6, 4), colour(x)) for x in k] if isinstance(k, list) else Image.new("RGB", (6, 4), colour(k))

    full = [{**{c: _neutral(f) for c, f in feats.items() if c != "image"}, **{c: v for c, v in r.items() if c != "k"},
             "image": image(r["k"])} for r in rows]
    return datasets.Dataset.from_dict({c: [r[c] for r in full] for c in feats}, features=feats)


def _features(repo, config):
    return HUB["infovqa"] if config == "InfographicVQA" else HUB[repo]


@pytest.fixture(scope="module")
def repos(tmp_path_factory):
    """repo name -> a folder laid out like the hub repo (README configs block + parquet shards)."""
    root = tmp_path_factory.mktemp("hub")
    readme: dict[str, dict] = {}
    for (repo, config, split), rows in ROWS.items():
        folder = config or "data"
        path = root / repo / folder / f"{split}-00000-of-00001.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        _table(_features(repo, config), rows).to_parquet(str(path))
        readme.setdefault(repo, {}).setdefault(config or "default", []).append((split, f"{folder}/{split}-*"))
    for repo, configs in readme.items():
        lines = ["---", "configs:"]
        for config, files in configs.items():
            lines += [f"- config_name: {config}", "  data_files:"]
            lines += [f"  - split: {s}\n    path: {p}" for s, p in files]
        (root / repo / "README.md").write_text("\n".join(lines + ["---", ""]))
    return {repo: root / repo for repo in readme}


# Expected: the row (index among the loaded samples) to check, and what its Sample holds.
EXPECT = {
    "ai2d": dict(n=4, row=1, k=1, question="How many legs are labelled?\nA. 1\nB. 2\nC. 3\nD. 4",
                 choices=("1", "2", "3", "4"), answer="B", answer_type="choice"),
    "chartqa": dict(n=3, row=0, k=4, question="What is the value of Japan in 2019?", answer="14",
                    answer_type="number", category="human_test"),
    "docvqa": dict(n=2, row=0, k=7, question="What is the name of the company?", answer="Tobacco Institute",
                   answers=("Tobacco Institute", "The Tobacco Institute", "Tobacco Institute"), answer_type="word",
                   id="49153"),
    "infovqa": dict(n=2, row=0, k=10, question="What percentage of people use email?", answer="46%",
                    answers=("46%", "46"), answer_type="word", id="98313"),
    "realworldqa": dict(n=2, row=0, k=12, question=RWQA_Q, choices=("The car", "The tree", "The sign"),
                        answer="B", answer_type="choice"),
    "seedbench": dict(n=3, row=0, k=14, question="How many towels are in the image?\nA. One\nB. Two\nC. Three\nD. Four",
                      choices=("One", "Two", "Three", "Four"), answer="C", answer_type="choice", id="101669"),
    "scienceqa_img": dict(n=3, row=1, k=21, question="Which animal's feet are also adapted for sticking to smooth "
                          "surfaces?\nA. tokay gecko\nB. hippopotamus", choices=("tokay gecko", "hippopotamus"),
                          answer="A", answer_type="choice", context=SQA_HINT),
    "mmstar": dict(n=2, row=0, k=24, question=MMSTAR_Q, answer="A", answer_type="choice", id="0",
                   choices=("The suitcase is on the book.", "The suitcase is beneath the cat.",
                            "The suitcase is beside the book.", "The suitcase is beneath the bed."),
                   category="image scene and topic"),
    "cub200": dict(n=2, row=0, k=26, question=CUB_Q.removeprefix("<image>\n"), answer="B", answer_type="choice",
                   choices=("Black footed Albatross", "Laysan Albatross", "Sooty Albatross")),
    "pixmocount": dict(n=1, row=0, k=28, question="How many people are in this image?", answer="7", answer_type="number"),
    "pathvqa": dict(n=2, row=0, k=29, question="Is there coagulative necrosis?", answer="yes", answer_type="yesno"),
    "textvqa": dict(n=2, row=0, k=32, question="what is the brand of this camera?", answer="dakota",
                    answers=tuple(TEXTVQA_ANSWERS), answer_type="word", id="34602"),
    "timeclock": dict(n=1, row=0, k=34, question="What time does the clock show?", answer="3:45", answer_type="time"),
}


def _path(repos, name):
    return str(repos[REPO_OF.get(name, name)])


def _check(s: Sample, exp: dict, name: str):
    assert s.question == exp["question"]
    assert s.choices == exp.get("choices", ())
    assert (s.answer, s.answer_type) == (exp["answer"], exp["answer_type"])
    assert s.answers == exp.get("answers", (exp["answer"],))
    assert (s.context, s.category) == (exp.get("context", ""), exp.get("category", ""))
    if "id" in exp:
        assert s.id == exp["id"]
    assert s.image.mode == "RGB" and s.image.size == (6, 4) and s.image.getpixel((0, 0)) == colour(exp["k"])
    assert s.skill == name and s.meta["benchmark"] == name


def test_every_study_set_has_a_preset():
    assert set(EXPECT) == set(benchmarks.names())
    assert benchmarks.names("heldout") == ["ai2d", "chartqa", "docvqa", "infovqa", "realworldqa", "seedbench",
                                           "scienceqa_img", "mmstar"]
    for name in benchmarks.names():
        spec = benchmarks.get(name)
        assert spec["metric"] in benchmarks.METRICS and spec["max_new_tokens"] >= 1
        assert spec["hf"] in HUB_ID_REPO
    assert benchmarks.get("mmstar")["aggregation"] == "macro"
    assert benchmarks.get("infovqa")["config"] == "InfographicVQA" and benchmarks.get("docvqa")["config"] == "DocVQA"


@pytest.mark.parametrize("repo, config, split", sorted({(r, c or "", s) for r, c, s in ROWS}))
def test_local_copies_have_the_hub_features(repos, repo, config, split):
    ds = datasets.load_dataset(str(repos[repo]), name=config or None, split=split)
    assert ds.features == _features(repo, config)
    assert ds.num_rows == len(ROWS[(repo, config or None, split)])


@pytest.mark.parametrize("name", list(EXPECT))
def test_preset_loads_the_known_record(repos, name):
    exp = EXPECT[name]
    samples = load_samples({"benchmark": name, "path": _path(repos, name)})
    assert len(samples) == exp["n"]
    _check(samples[exp["row"]], exp, name)


def test_presets_read_the_hub_ids_the_same_way(repos, monkeypatch):
    """With no `path`, the preset's hub id, config and split reach load_dataset (served here
    from the local copies), and give the same samples."""
    real, calls = datasets.load_dataset, []

    def fake(path, name=None, split=None, revision=None, **kw):
        calls.append((path, name, split, revision))
        return real(str(repos[HUB_ID_REPO[path]]), name=name, split=split, **kw)

    monkeypatch.setattr(datasets, "load_dataset", fake)
    for name, exp in EXPECT.items():
        samples = load_samples({"benchmark": name})
        spec = benchmarks.get(name)
        assert calls[-1] == (spec["hf"], spec.get("config"), spec["split"], None)
        _check(samples[exp["row"]], exp, name)
    load_samples({"benchmark": "pathvqa", "split": "train", "revision": "abc123"})
    assert calls[-1] == ("flaviagiammarino/path-vqa", None, "train", "abc123")


def test_ai2d_digit_options_and_index_answers(repos):
    s = load_samples({"benchmark": "ai2d", "path": _path(repos, "ai2d")})
    assert [x.answer for x in s] == ["B", "B", "C", "A"]  # "1" with options ["1","2","3","4"] is B, not A
    assert {x.answer_type for x in s} == {"choice"}
    plain = load_samples({"hf": _path(repos, "ai2d"), "split": "test", "columns": {"choices": "options"}})
    assert [x.answer for x in plain] == ["B", "B", "C", "A"]


def test_scienceqa_int8_answers_and_the_full_config(repos):
    s = load_samples({"benchmark": "scienceqa_img", "path": _path(repos, "scienceqa")})
    assert [x.answer for x in s] == ["A", "A", "C"] and [x.context for x in s] == ["", SQA_HINT, ""]
    full = {"hf": _path(repos, "scienceqa"), "config": "ScienceQA-FULL", "split": "test",
            "columns": {"choices": "choices", "context": "hint"}}
    with pytest.raises(DataError, match=r"record 0.*'image'.*no image"):
        load_samples(full)  # FULL has text-only questions (image None)
    assert [x.answer for x in load_samples({**full, "n": "end:1"})] == ["B"]


def test_seedbench_filter_and_multi_image(repos):
    src = {"hf": _path(repos, "seedbench"), "split": "test",
           "columns": {"choices": ["choice_a", "choice_b", "choice_c", "choice_d"], "id": "question_id"}}
    with pytest.raises(DataError) as e:
        load_samples(src)
    msg = str(e.value)
    assert "record 1" in msg and "'2000'" in msg and "3 images" in msg and "multi_image: first" in msg
    first = load_samples({**src, "multi_image": "first"})
    assert len(first) == 4 and first[1].image.getpixel((0, 0)) == colour(15) and first[1].answer == "B"
    kept = load_samples({**src, "filter": {"data_type": "image"}})
    assert [x.id for x in kept] == ["101669", "101670", "101671"]
    assert [x.id for x in load_samples({**src, "filter": {"data_type": ["video"]}, "multi_image": "first"})] == ["2000"]
    with pytest.raises(DataError, match=r"keeps no rows.*'image', 'video'"):
        load_samples({**src, "filter": {"data_type": "audio"}})


def test_missing_or_unknown_config_names_the_configs(repos):
    for name in ("docvqa", "scienceqa"):  # configs in the hub cards' order
        with pytest.raises(DataError) as e:
            load_samples({"hf": str(repos[name]), "split": "test"})
        msg = str(e.value)
        assert "`config:`" in msg and str(repos[name]) in msg
        assert ("'DocVQA', 'InfographicVQA'" in msg) if name == "docvqa" else ("'ScienceQA-FULL', 'ScienceQA-IMG'" in msg)
    with pytest.raises(DataError) as e:
        load_samples({"hf": str(repos["docvqa"]), "config": "InfoVQA", "split": "validation"})
    assert "'InfoVQA' not found" in str(e.value) and "'InfographicVQA'" in str(e.value)


def test_column_map_naming_a_missing_column(repos):
    with pytest.raises(DataError) as e:
        load_samples({"hf": str(repos["docvqa"]), "config": "DocVQA", "split": "validation", "columns": {"answer": "answer"}})
    msg = str(e.value)
    assert "column 'answer' (for field 'answer')" in msg and "'answers'" in msg and "'questionId'" in msg
    with pytest.raises(DataError) as e:
        load_samples({"hf": str(repos["seedbench"]), "split": "test", "columns": {"choices": ["choice_a", "choice_e"]}})
    assert "'choice_e' (for field 'choices')" in str(e.value) and "'choice_d'" in str(e.value)
    with pytest.raises(DataError, match=r"'kind' \(for the filter\)"):
        load_samples({"hf": str(repos["seedbench"]), "split": "test", "filter": {"kind": "image"}})


def test_unknown_benchmark_and_source_keys():
    with pytest.raises(DataError) as e:
        load_samples({"benchmark": "scienceqa"})
    assert "Did you mean 'scienceqa_img'?" in str(e.value) and "mmstar" in str(e.value)
    with pytest.raises(DataError, match="unknown key"):
        load_samples({"benchmark": "ai2d", "columns": {}})
    assert check_source({"benchmark": "ai2d", "path": "/x", "n": 5, "seed": 3}) == "benchmark"
    assert "benchmark" in _SOURCE_OPTIONS and "config" in _SOURCE_OPTIONS["hf"] and "benchmark" in _SOURCE_FORMS
    with pytest.raises(DataError, match="seed"):
        check_source({"hf": "x", "seed": -1})


def test_subsets_are_fixed_whatever_the_trial_seed(repos):
    src = {"benchmark": "seedbench", "path": _path(repos, "seedbench"), "n": "random:2"}
    ids = [x.id for x in load_samples(src, seed=0)]
    assert len(ids) == 2 and all([x.id for x in load_samples(src, seed=s)] == ids for s in (1, 10000, 12345))
    other = {tuple(x.id for x in load_samples({**src, "seed": s})) for s in range(1, 8)}
    assert len(other) > 1  # the source's own seed picks the subset
    assert [x.id for x in load_samples({**src, "n": 2})] == ["101669", "101670"]  # after the filter


def test_answer_errors_name_the_row(tmp_path):
    feats = F(question=S, options=L(S), answer=S, image=IMG)
    _table(feats, [dict(k=0, question="q?", options=["a", "b"], answer="5")]).to_parquet(str(tmp_path / "d.parquet"))
    with pytest.raises(DataError, match=r"record 0.*index 5 is outside the 2 choices"):
        load_samples({"hf": str(tmp_path / "d.parquet"), "columns": {"choices": "options"}})
    with pytest.raises(DataError, match="contradicts"):
        load_samples({"hf": str(tmp_path / "d.parquet"), "columns": {"choices": "options"}, "answer_type": "number"})


def test_save_to_disk_copy_with_config_folders(tmp_path):
    ds = _table(HUB["scienceqa"], ROWS[("scienceqa", "ScienceQA-IMG", "test")])
    datasets.DatasetDict({"test": ds}).save_to_disk(str(tmp_path / "sqa" / "ScienceQA-IMG"))
    s = load_samples({"benchmark": "scienceqa_img", "path": str(tmp_path / "sqa")})
    _check(s[1], EXPECT["scienceqa_img"], "scienceqa_img")
    with pytest.raises(DataError, match="no subfolder 'ScienceQA-FULL'"):
        load_samples({"hf": str(tmp_path / "sqa" / "ScienceQA-IMG"), "config": "ScienceQA-FULL", "split": "test"})


def test_classlabel_answers_and_category(tmp_path):
    feats = F(question=S, label=datasets.ClassLabel(names=["cat", "dog"]), image=IMG)
    _table(feats, [dict(k=1, question="What animal?", label=1)]).to_parquet(str(tmp_path / "c.parquet"))
    s = load_samples({"hf": str(tmp_path / "c.parquet"), "columns": {"answer": "label", "category": "label"},
                      "filter": {"label": "dog"}})
    assert (s[0].answer, s[0].answer_type, s[0].category) == ("dog", "word", "dog")


def test_inline_options_and_sample_defaults():
    assert parse_choices("Q\nOptions: A: 1, 2 and 3, B: Note: none, C: x") == ("1, 2 and 3", "Note: none", "x")
    assert parse_choices("Options: B: x, C: y") == () and parse_choices("Q\nOptions: A: only") == ()
    s = Sample(Image.new("RGB", (2, 2)), "q", "a")
    assert (s.answers, s.context, s.category) == (("a",), "", "")
