"""Mistakes users make in files (not only typed values): each is refused by `lmm-ray validate` and
`lmm-ray sweep` with exit code 2, a message naming the field and a word of the fix, no traceback,
and no Ray started. Also: a second sweep of the same name is refused while one runs, and no
password of a tracking URI is printed, written or logged."""

from __future__ import annotations

import fcntl
import json
import textwrap
from pathlib import Path

import pytest

from lmm_ray import cli

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "sweeps" / "smoke.yaml"
BASE = """\
name: bad
model: tiny:qwen2_5_vl
stages:
  - skill: count
    steps: 3
heldout: [color]
search_space: {recipe: sa_proj, lr: 1.0e-3}
"""


def _run(capsys, verb: str, path, *args) -> tuple[int, str, str]:
    import ray

    was = ray.is_initialized()  # (a session-wide Ray of other tests may be up)
    rc = cli.main([verb, str(path), *args])
    out, err = capsys.readouterr()
    assert ray.is_initialized() == was, "Ray started for bad input"
    return rc, out, err


def _file(tmp_path: Path, text: str, name: str = "sweep.yaml", raw: bytes | None = None) -> Path:
    p = tmp_path / name
    if raw is not None:
        p.write_bytes(raw)
    else:
        p.write_text(textwrap.dedent(text))
    return p


FILE_CASES = [
    # (id, sweep text, expected words in the error)
    ("stage-key-twice", BASE.replace("    steps: 3\n", "    steps: 3\n    skill: clock\n"),
     ["key 'skill' appears twice", "lines 4 and 6", "its own `- `"]),
    ("search-block-twice", BASE + "search: {num_trials: 4}\nsearch: {seed: 1}\n", ["key 'search' appears twice", "remove or merge"]),
    ("tab-indent", BASE.replace("    steps: 3", "\tsteps: 3"), ["not valid YAML", "fix the YAML"]),
    ("name-dotdot", BASE.replace("name: bad", "name: .."), ["name", "not a folder name of its own", "give the sweep a name"]),
    ("name-with-slash", BASE.replace("name: bad", "name: a/b"), ["name", "may only contain", "e.g. a_b"]),
    ("heldout-all-lmms", BASE.replace("heldout: [color]", "heldout: [{name: chart, lmms_eval: chartqa}]"),
     ["heldout", "every held-out entry is an lmms-eval task", "add at least one"]),
    ("unknown-metric", BASE.replace("heldout: [color]", "heldout: [color, {name: m, data: {llava_json: x.json, "
                                                        "image_folder: ., metric: acc}}]"),
     ["heldout.1.data.metric", "'acc' is not a valid choice", "use one of"]),
    ("context-template-without-placeholder",
     BASE.replace("heldout: [color]", "heldout: [color, {name: m, data: {benchmark: scienceqa_img, context_template: 'Hint: '}}]"),
     ["heldout.1.data.context_template", "no {context} placeholder", "Context: {context}"]),
    ("bad-max-new-tokens", BASE.replace("heldout: [color]", "heldout: [color, {name: m, data: {benchmark: ai2d, max_new_tokens: 0}}]"),
     ["heldout.1.data.max_new_tokens", "out of range", ">= 1"]),
    ("unknown-benchmark", BASE.replace("heldout: [color]", "heldout: [color, {name: m, data: {benchmark: ai2dd}}]"),
     ["heldout.1.data", "ai2dd", "ai2d"]),
    ("weight-dtype-typo", BASE + "train: {weight_dtype: bfloat16}\n", ["train.weight_dtype", "not a valid choice", "bf16"]),
    ("strategy-typo", BASE + "resources: {strategy: fsdp2}\n", ["resources.strategy", "Did you mean 'fsdp'", "auto"]),
    ("flash-attention-on-cpu", BASE + "train: {attn_implementation: flash_attention_2}\n",
     ["train.attn_implementation", "NVIDIA GPUs only", "use sdpa"]),
    ("negative-gpu-memory", BASE + "resources: {gpu_memory_gb: -80}\n", ["resources.gpu_memory_gb", "out of range", "> 0"]),
    ("caption-probe-negative", BASE + "eval: {caption_probe_n: -1}\n", ["eval.caption_probe_n", "out of range", ">= 0"]),
    ("lmms-include-path-missing", BASE + "eval: {lmms_include_path: /nowhere/tasks}\n",
     ["eval.lmms_include_path", "not a folder", "task YAMLs"]),
]


@pytest.mark.parametrize("verb", ["validate", "sweep"])
@pytest.mark.parametrize("text,expect", [c[1:] for c in FILE_CASES], ids=[c[0] for c in FILE_CASES])
def test_file_mistakes_exit_2_before_ray(capsys, tmp_path, verb, text, expect):
    path = _file(tmp_path, text + f"storage: {tmp_path / 'runs'}\n")
    rc, out, err = _run(capsys, verb, path)
    assert rc == 2, (out, err)
    assert "Traceback" not in err
    for word in expect:
        assert word in err, f"{word!r} not in:\n{err}"


def test_a_sweep_file_in_windows_1252_is_refused_with_how_to_save_it(capsys, tmp_path):
    path = _file(tmp_path, "", raw=(BASE.replace("name: bad", "name: bad  # caf\xe9") + f"storage: {tmp_path}\n").encode("cp1252"))
    rc, _, err = _run(capsys, "validate", path)
    assert rc == 2 and "is not UTF-8 text (byte 0xe9 on line 1)" in err and "save the file as UTF-8" in err


def test_a_byte_order_mark_is_fine(capsys, tmp_path):
    path = _file(tmp_path, "", raw=("\ufeff" + BASE + f"storage: {tmp_path}\n").encode("utf-8"))
    rc, out, err = _run(capsys, "validate", path)
    assert rc == 0, err


RECIPE_CASES = [
    ("last_n-word", "mine: {roles: [llm.attn.q], last_n: two}\n", ["recipe 'mine', field last_n", "whole number"]),
    ("lora-rank-0", "mine: {lora: {rank: 0, roles: [llm.attn.q]}}\n", ["recipe 'mine', field lora.rank", ">= 1"]),
    ("lora-alpha-negative", "mine: {lora: {alpha: -16, roles: [llm.attn.q]}}\n", ["field lora.alpha", "> 0"]),
    ("lora-dropout-one", "mine: {lora: {dropout: 1.0, roles: [llm.attn.q]}}\n", ["field lora.dropout", "[0, 1)"]),
    ("wise-ft-alpha-big", "mine: {roles: [llm.mlp.down], wise_ft: {alpha: 2}}\n", ["field wise_ft.alpha", "[0, 1]"]),
    ("lwf-unknown-key", "mine: {roles: [llm.mlp.down], lwf: {weigth: 1}}\n", ["field lwf.weigth", "valid keys: weight, temperature"]),
    ("roles-not-a-list", "mine: {roles: {q: 1}}\n", ["field roles", "list of names"]),
    ("recipe-key-twice", "mine: {roles: [llm.attn.q]}\nmine: {roles: [llm.attn.k]}\n", ["key 'mine' appears twice"]),
]


@pytest.mark.parametrize("text,expect", [c[1:] for c in RECIPE_CASES], ids=[c[0] for c in RECIPE_CASES])
def test_recipe_file_mistakes_exit_2(capsys, tmp_path, text, expect):
    recipes = _file(tmp_path, text, name="recipes.yaml")
    path = _file(tmp_path, BASE.replace("recipe: sa_proj", "recipe: mine") + f"recipes_file: {recipes}\nstorage: {tmp_path}\n")
    rc, out, err = _run(capsys, "validate", path)
    assert rc == 2, (out, err)
    assert "recipes_file" in err and "Traceback" not in err
    for word in expect:
        assert word in err, f"{word!r} not in:\n{err}"
    assert cli.main(["recipes", "--recipe-file", str(recipes)]) == 2  # the same file through another verb
    assert "Traceback" not in capsys.readouterr().err


def test_every_recipe_of_a_wide_space_is_resolved(capsys, tmp_path):
    """A broken recipe listed last is found although a wide numeric range (LoRA rank 1..1000) comes
    with it: numeric ranges are checked at their ends, not enumerated (nor truncated)."""
    recipes = _file(tmp_path, "late_bad: {roles: [llm.attn.q], layers: '9-10'}\n", name="recipes.yaml")
    path = _file(tmp_path, BASE.replace("search_space: {recipe: sa_proj, lr: 1.0e-3}",
                                        "search_space: {recipe: {choice: [lora, sa_proj, late_bad]}, lr: 1.0e-3, "
                                        "lora_rank: {randint: [1, 1000]}}") + f"recipes_file: {recipes}\nstorage: {tmp_path}\n")
    rc, _, err = _run(capsys, "validate", path)
    assert rc == 2 and "recipe=late_bad" in err and "outside the model" in err, err


@pytest.mark.parametrize("storage,expect", [("/proc/lmm_ray_runs", "cannot write the sweep folder"),
                                            ("FILE", "is a file")])
def test_storage_that_cannot_hold_the_sweep_is_refused(capsys, tmp_path, storage, expect):
    if storage == "FILE":
        (tmp_path / "f").write_text("x")
        storage = str(tmp_path / "f")
    rc, _, err = _run(capsys, "validate", SMOKE, f"storage={storage}")
    assert rc == 2 and err.startswith("lmm-ray validate: error: storage:") and expect in err and "fix:" in err


def test_a_second_sweep_of_the_same_name_is_refused_while_one_runs(capsys, tmp_path):
    folder = tmp_path / "smoke"
    folder.mkdir()
    with open(folder / ".lock", "a+") as held:  # what a running `lmm-ray sweep` holds
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("pid 4242 on elsewhere")
        held.flush()
        rc, _, err = _run(capsys, "sweep", SMOKE, f"storage={tmp_path}")
    assert rc == 2 and "is running now (pid 4242 on elsewhere)" in err and "name=" in err


def test_no_password_is_printed_written_or_logged(capsys, tmp_path):
    from lmm_ray import config, tracking

    uri = "postgresql://alice:hunter2secret@127.0.0.1:1/mlflow"
    rc, out, err = _run(capsys, "validate", SMOKE, f"storage={tmp_path}", f"tracking.mlflow_uri={uri}")
    assert rc == 2 and "alice:***@127.0.0.1" in err and "hunter2secret" not in out + err
    cfg = config.load_sweep(SMOKE, [f"storage={tmp_path}", f"tracking.mlflow_uri={uri}"])
    assert cfg.mlflow_uri == uri  # the run itself still uses it
    public = cfg.public_dict()  # sweep.json and the MLflow params are made from this
    assert "hunter2secret" not in json.dumps(public) and "alice:***@" in json.dumps(public)
    assert not any("hunter2secret" in str(v) for v in tracking._flat(public, "sweep.").values())
    with pytest.raises(ConnectionError) as e:
        tracking.check_reachable("http://bob:pa55word@127.0.0.1:9")
    assert "pa55word" not in str(e.value) and "bob:***@" in str(e.value)


# ---------------------------------------------------------------------------------------------
# Model references: a local folder is never sent to the hub; a reference that is neither says both,
# in one short request (transformers' own download retries for ~30 s, then blames the network).


@pytest.fixture
def hub(monkeypatch):
    """The hub as this test wants it: online (HF_HUB_OFFLINE unset) with `model_info` answering
    `hub.answer` (an exception to raise, or None for "exists"); records every call. Any download
    through transformers that is not cache-only fails the test (that is the retry storm)."""
    import huggingface_hub
    import huggingface_hub.constants
    import transformers

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)

    class Hub:
        answer: Exception | None = OSError("[Errno -2] Name or service not known")
        calls: list = []

    def model_info(self, repo_id, timeout=None, **kw):
        Hub.calls.append((repo_id, timeout))
        if Hub.answer is not None:
            raise Hub.answer
        return object()

    real = transformers.AutoConfig.from_pretrained.__func__

    def from_pretrained(cls, ref, *a, **kw):
        assert kw.get("local_files_only") or Path(str(ref)).exists(), f"{ref} sent to the hub by transformers"
        return real(cls, ref, *a, **kw)

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", model_info)
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", classmethod(from_pretrained))
    return Hub


def _not_found():
    import httpx2
    from huggingface_hub.errors import RepositoryNotFoundError

    return RepositoryNotFoundError("404 Repository Not Found", response=httpx2.Response(
        404, request=httpx2.Request("GET", "https://huggingface.co/api/models/x")))


@pytest.mark.parametrize("answer,says", [("unreachable", "the hub could not be reached"),
                                         ("missing", "the hub has no model myorg/mymodel")])
def test_an_owner_name_model_that_is_no_folder_says_both_at_once(capsys, tmp_path, hub, answer, says):
    import time

    if answer == "missing":
        hub.answer = _not_found()
    path = _file(tmp_path, BASE.replace("tiny:qwen2_5_vl", "myorg/mymodel") + f"storage: {tmp_path}\n")
    t0 = time.monotonic()
    rc, out, err = _run(capsys, "validate", path)
    assert rc == 2 and "Traceback" not in err, err
    assert err.startswith(f"lmm-ray validate: error: model: 'myorg/mymodel' is not a local folder "
                          f"(looked in {tmp_path / 'myorg/mymodel'} and {Path.cwd() / 'myorg/mymodel'})"), err
    assert says in err and "fix: give a local folder" in err and "check the hub id and the network" in err
    assert hub.calls == [("myorg/mymodel", 10.0)]  # one request with a timeout, no retries
    assert time.monotonic() - t0 < 15  # was ~30 s of back-off before the refusal


def test_offline_mode_refuses_a_hub_id_without_asking_the_hub(capsys, tmp_path, hub, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = _file(tmp_path, BASE.replace("tiny:qwen2_5_vl", "myorg/mymodel") + f"storage: {tmp_path}\n")
    rc, _, err = _run(capsys, "validate", path)
    assert rc == 2 and "HF_HUB_OFFLINE is set and the model is not in the HF cache" in err and "fix:" in err
    assert hub.calls == []


@pytest.mark.parametrize("where", ["beside-the-sweep-file", "absolute"])
def test_a_local_model_folder_is_never_sent_to_the_hub(capsys, tmp_path, hub, where):
    from lmm_ray import models

    folder = tmp_path / "myorg" / "mymodel"
    models.build_tiny("qwen2_5_vl").model.config.save_pretrained(folder)  # validate reads the config only
    ref = "myorg/mymodel" if where == "beside-the-sweep-file" else str(folder)
    path = _file(tmp_path, BASE.replace("tiny:qwen2_5_vl", ref) + f"storage: {tmp_path}\n")
    rc, out, err = _run(capsys, "validate", path)
    assert rc == 0, err
    assert f"model      {folder} (qwen2_5_vl)" in out and hub.calls == []


def test_a_dot_slash_model_folder_that_is_missing_is_refused_without_the_hub(capsys, tmp_path, hub):
    path = _file(tmp_path, BASE.replace("tiny:qwen2_5_vl", "./models/mine") + f"storage: {tmp_path}\n")
    rc, _, err = _run(capsys, "validate", path)
    assert rc == 2 and f"local model folder not found: ./models/mine (looked in {tmp_path / 'models/mine'} and " in err
    assert "fix: give an existing folder" in err
    assert hub.calls == []


@pytest.mark.parametrize("verb", [["recipes", "--model"], ["eval", "--n", "1", "--model"]])
def test_other_verbs_refuse_a_missing_model_the_same_way(capsys, hub, verb):
    rc = cli.main([*verb, "nobody-xyz/no-such-model"])
    err = capsys.readouterr().err
    assert rc == 2 and "'nobody-xyz/no-such-model' is not a local folder" in err and "Traceback" not in err
    assert "fix: give a local folder" in err and len(hub.calls) == 1


# ---------------------------------------------------------------------------------------------
# Search spaces with less to search than trials: a trial's seed is train.seed, so a repeated
# configuration is a whole trial for the same result.


@pytest.mark.parametrize("space,trials,expect", [
    ("{recipe: sa_proj, lr: 1.0e-3}", 2, ["all 2 trials would be the same configuration", "search.num_trials: 1",
                                          "a range or a choice", "lmm-ray train"]),
    ("{recipe: {choice: [sa_proj, mlp]}, lr: {choice: [1.0e-3, 1.0e-4]}}", 6,
     ["only 4 configurations (recipe 2 x lr 2)", "2 trial(s) would repeat", "search.num_trials: 4", "grid"]),
    ("{recipe: sa_proj, lr: 1.0e-3, last_n: {randint: [1, 2]}}", 3, ["only 2 configurations (last_n 2)"]),
])
def test_more_trials_than_configurations_is_refused(capsys, tmp_path, space, trials, expect):
    text = BASE.replace("{recipe: sa_proj, lr: 1.0e-3}", space) + f"search: {{num_trials: {trials}}}\nstorage: {tmp_path}\n"
    rc, _, err = _run(capsys, "sweep", _file(tmp_path, text))
    assert rc == 2 and err.startswith(f"lmm-ray sweep: error: {tmp_path / 'sweep.yaml'}: search.num_trials: is {trials}")
    assert "Traceback" not in err and "fix:" in err
    for word in expect:
        assert word in err, f"{word!r} not in:\n{err}"
    assert not (tmp_path / "bad").exists()  # refused before the sweep folder (or Tune state) is made


def test_a_fixed_space_without_num_trials_runs_one_trial(capsys, tmp_path):
    from lmm_ray import config, sweep

    rc, out, err = _run(capsys, "validate", _file(tmp_path, BASE + f"storage: {tmp_path}\n"))
    assert rc == 0, err
    assert "search     one fixed configuration (no value is searched): 1 trial" in out
    cfg = config.load_sweep(tmp_path / "sweep.yaml")
    assert cfg.search.num_trials == 1  # the default 8 is capped at the space's one configuration
    assert sweep.make_searcher(cfg) is None  # Tune's default search: Optuna refuses an empty space
    two = config.load_sweep(tmp_path / "sweep.yaml", ["search_space.recipe={choice: [sa_proj, mlp]}"])
    assert two.search.num_trials == 2 and sweep.make_searcher(two) is not None


def test_as_many_trials_as_configurations_suggests_grid_in_the_plan(capsys, tmp_path):
    text = BASE.replace("recipe: sa_proj", "recipe: {choice: [sa_proj, mlp]}") + f"search: {{num_trials: 2}}\nstorage: {tmp_path}\n"
    rc, out, err = _run(capsys, "validate", _file(tmp_path, text))
    assert rc == 0, err
    assert "exactly 2 configurations: tpe may repeat some; grid runs each once" in out


# ---------------------------------------------------------------------------------------------
# Local resources: what the local Ray (all of os.cpu_count(), the object store) can place.


@pytest.mark.parametrize("workers,cpus,ok", [(2, 1, True), (4, 1, False), (2, 1.5, False)])
def test_a_trial_the_local_machine_cannot_place_is_refused(capsys, tmp_path, monkeypatch, workers, cpus, ok):
    """2 one-CPU workers fit a 2-core machine (the trial's driver holds one byte of memory, no CPU:
    a smoke sweep ran so); 4, or 2 of 1.5 CPUs, would wait for CPUs that never come."""
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    rc, out, err = _run(capsys, "validate", SMOKE, f"storage={tmp_path}", f"resources.num_workers={workers}",
                        f"resources.cpus_per_worker={cpus}")
    if ok:
        assert rc == 0, err
        assert "resources  2 worker(s) x 1 CPU per trial" in out and "queue" not in out
        return
    assert rc == 2 and "Traceback" not in err
    assert f"resources.num_workers: a trial needs {workers} workers x {cpus:g} CPUs" in err and "this machine has 2" in err
    assert "fix: lower resources.num_workers or resources.cpus_per_worker (at most 2 CPUs per trial)" in err


def test_more_trials_at_once_than_cores_queue_and_the_plan_says_so(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    rc, out, err = _run(capsys, "validate", SMOKE, f"storage={tmp_path}", "search.max_concurrent=2",
                        "resources.cpus_per_worker=2")
    assert rc == 0, err
    assert ("queue      search.max_concurrent is 2, but this machine holds 1 trial(s) (2 CPUs each, of 2 CPUs): "
            "trials run one at a time, the rest wait") in out


def test_too_little_free_memory_for_ray_is_refused(capsys, tmp_path, monkeypatch):
    import psutil

    real = psutil.virtual_memory()
    monkeypatch.setattr(psutil, "virtual_memory", lambda: real._replace(available=300 * 2**20))
    rc, _, err = _run(capsys, "validate", SMOKE, f"storage={tmp_path}")
    assert rc == 2 and "resources: this machine has 300 MiB of memory free" in err and "object store" in err
    assert "fix: free memory" in err


# ---------------------------------------------------------------------------------------------
# The CLI boundary: a user's mistake is one message (exit 2); anything else is a bug, whose
# traceback is the report, ending with how to get more detail and where to send it.


def test_an_unexpected_error_keeps_its_traceback_and_says_how_to_report_it(capsys, monkeypatch):
    def broken(a):
        raise RuntimeError("a bug inside lmm_ray")

    monkeypatch.setattr(cli, "cmd_validate", broken)
    monkeypatch.delenv("LMM_RAY_DEBUG", raising=False)
    rc = cli.main(["validate", str(SMOKE)])
    err = capsys.readouterr().err
    assert rc == 1
    assert "Traceback (most recent call last)" in err and "RuntimeError: a bug inside lmm_ray" in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("lmm-ray validate: internal error (a bug in lmm_ray")
    assert "rerun with LMM_RAY_DEBUG=1" in last and "issue tracker" in last and "/tmp/ray/session_latest/logs" in last


def test_debug_mode_shows_a_user_errors_traceback_and_turns_up_rays_logs(capsys, tmp_path, monkeypatch):
    import os

    monkeypatch.setenv("RAY_BACKEND_LOG_LEVEL", "unset")
    monkeypatch.delenv("RAY_BACKEND_LOG_LEVEL")  # (undone at the end: nothing leaks into later tests)
    monkeypatch.setenv("LMM_RAY_DEBUG", "1")
    rc = cli.main(["validate", str(_file(tmp_path, BASE.replace("steps: 3", "steps: -3")))])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback (most recent call last)" in err and "stages.0.steps" in err.splitlines()[-2]
    assert os.environ["RAY_BACKEND_LOG_LEVEL"] == "debug"
    monkeypatch.setenv("LMM_RAY_DEBUG", "0")
    assert cli.main(["validate", str(tmp_path / "sweep.yaml")]) == 2 and "Traceback" not in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Who can read a sweep, and whom --resume trusts (it unpickles Tune's state from the folder).


def _tune_state(folder: Path) -> Path:
    (folder / "tune").mkdir(parents=True)
    (folder / "tune" / "tuner.pkl").write_bytes(b"pickled")
    (folder / "tune" / "experiment_state-1.json").write_text("{}")
    for p in (folder, folder / "tune"):
        p.chmod(0o700)
    for p in (folder / "tune").iterdir():
        p.chmod(0o600)
    return folder


@pytest.mark.parametrize("what,change,says", [
    ("tune", lambda p: p.chmod(0o770), "can be written by its group (mode drwxrwx---)"),
    ("tune/tuner.pkl", lambda p: p.chmod(0o666), "can be written by everyone"),
    ("", lambda p: p.chmod(0o757), "can be written by everyone"),
    ("tune/experiment_state-1.json", None, "is owned by"),
])
def test_resume_refuses_tune_state_that_others_can_write(capsys, tmp_path, monkeypatch, what, change, says):
    import os

    folder = _tune_state(tmp_path / "smoke")
    target = folder / what if what else folder
    if change is not None:
        change(target)
    else:  # a file another user put there (this user is made someone else: no root needed)
        real = os.stat

        def stat(p, *a, **kw):
            st = real(p, *a, **kw)
            return os.stat_result((st.st_mode, st.st_ino, st.st_dev, st.st_nlink, st.st_uid + 1, *st[5:])) \
                if Path(p) == target else st
        monkeypatch.setattr(os, "stat", stat)
    rc, _, err = _run(capsys, "sweep", SMOKE, f"storage={tmp_path}", "--resume")
    assert rc == 2 and "Traceback" not in err, err
    assert f"storage: --resume would load Ray Tune's pickled state from {folder}" in err and says in err
    assert "run code in this process" in err and f"chmod -R go-w {folder}" in err and "name=..." in err


def test_resume_trusts_a_private_folder_and_cannot_check_object_storage(tmp_path):
    from lmm_ray import private

    folder = _tune_state(tmp_path / "smoke")
    private.check_resume_trust(str(folder))  # yours, not writable by others: fine
    (folder / "tune" / "tuner.pkl").chmod(0o664)
    private.check_resume_trust(str(folder), resume=False)  # a new sweep reads nothing
    private.check_resume_trust("s3://bucket/runs/smoke")  # the bucket's policy is the guard (docs/cluster.md)
    with pytest.raises(Exception, match="can be written by its group"):
        private.check_resume_trust(str(folder))


def test_the_sweep_folder_is_created_private_and_the_sweep_writes_private_files(capsys, tmp_path, monkeypatch):
    import os
    import stat

    from lmm_ray import sweep

    storage = tmp_path / "team" / "runs"
    rc, _, err = _run(capsys, "validate", SMOKE, f"storage={storage}")
    assert rc == 0, err
    assert stat.S_IMODE((storage / "smoke").stat().st_mode) == 0o700  # the sweep: its user's
    assert stat.S_IMODE(storage.stat().st_mode) & 0o055  # the storage above: as the umask makes it (shareable)
    (storage / "opened").mkdir(mode=0o750)
    rc, _, err = _run(capsys, "validate", SMOKE, f"storage={storage}", "name=opened")
    assert rc == 0 and stat.S_IMODE((storage / "opened").stat().st_mode) == 0o750  # a user's own choice stays

    seen = {}

    def run(cfg, **kw):  # the driver's umask while the sweep runs
        seen["umask"] = os.umask(0o077)
        (Path(cfg.sweep_dir) / "sweep.json").write_text("{}")

    old = os.umask(0o022)
    try:
        monkeypatch.setattr(sweep, "run", run)
        assert cli.main(["sweep", str(SMOKE), f"storage={storage}"]) == 0
        assert os.umask(0o022) == 0o022  # given back after the sweep (cli.main runs in-process here)
    finally:
        os.umask(old)
    assert seen["umask"] == 0o077 and stat.S_IMODE((storage / "smoke" / "sweep.json").stat().st_mode) == 0o600


# ---------------------------------------------------------------------------------------------
# Messages that were vague: each now says what the file or value is and what to write.


@pytest.mark.parametrize("text,args,expect", [
    ("", (), ["the file is empty (or only comments)", "name, model, stages and search_space"]),
    ("# just a comment\n", (), ["the file is empty"]),
    ("recipe: {choice: [sa_proj, mlp]}\nlr: {loguniform: [1.0e-4, 1.0e-3]}\n", (),
     ["this is a search-space file (recipe, lr), not a sweep file", "`search_space: ", "lmm-ray train SWEEP --choice"]),
    (BASE.replace("heldout: [color]", "heldout: [all]"), (), ["heldout.0: 'all' inside a list is not a skill",
                                                              "`heldout: all` (no brackets)"]),
    (BASE, ("model=",), ["model: `model=` (empty) would remove it, but a sweep has no default model", "model=tiny:qwen2_5_vl"]),
    (BASE, ("search_space.lr=",), ["search_space.lr: `search_space.lr=` (empty)", "search_space.lr=1.0e-3"]),
    (BASE, ("stages.0=",), ["stages.0: `stages.0=` (empty) cannot remove a list entry", "stages=[...]"]),
])
def test_vague_inputs_get_a_clear_message(capsys, tmp_path, text, args, expect):
    path = _file(tmp_path, text + (f"storage: {tmp_path}\n" if text.startswith("name") else ""))
    rc, _, err = _run(capsys, "validate", path, *args)
    assert rc == 2 and "Traceback" not in err and "fix:" in err, err
    for word in expect:
        assert word in err, f"{word!r} not in:\n{err}"


@pytest.mark.parametrize("key,line,expect", [
    ("search_space", "search_space: side.yaml", "search_space: the search space file {side} is empty"),
    ("recipes_file", "recipes_file: side.yaml", "recipes_file: {side} defines no recipe"),
])
def test_an_empty_side_file_is_named(capsys, tmp_path, key, line, expect):
    side = _file(tmp_path, "# nothing yet\n", name="side.yaml")
    text = BASE if key != "search_space" else BASE.replace("search_space: {recipe: sa_proj, lr: 1.0e-3}\n", "")
    rc, _, err = _run(capsys, "validate", _file(tmp_path, text + f"{line}\nstorage: {tmp_path}\n"))
    assert rc == 2 and expect.format(side=side) in err and "fix:" in err and "Traceback" not in err, err


def test_an_empty_override_means_the_default(capsys, tmp_path):
    from lmm_ray import config

    path = _file(tmp_path, BASE + f"train: {{max_grad_norm: 0.5}}\nstorage: {tmp_path}\n")
    cfg = config.load_sweep(path, ["stages.0.steps=", "stages.0.epochs=0.5", "train.max_grad_norm="])
    assert (cfg.stages[0].steps, cfg.stages[0].epochs) == (None, 0.5)  # from steps to epochs
    assert cfg.train.max_grad_norm == 1.0  # the default, not the file's 0.5
    assert config.load_sweep(path, ["train.max_grad_norm=null"]).train.max_grad_norm is None  # null, when written
    rc, out, err = _run(capsys, "validate", path, "stages.0.epochs=")  # no epochs in the file: nothing to remove
    assert rc == 0 and "count (3 steps)" in out, err
