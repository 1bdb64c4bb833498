"""The scale-out checks of `lmm-ray validate`, before Ray starts: the memory table of every recipe,
a recipe that cannot fit the GPU refused with the fixes that would fit, `strategy: auto`, FSDP on a
family whose blocks are unknown, flash-attention on CPU trials. The bf16-capability check needs a
GPU without bf16 and is not exercised here."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml
from study_data import write_placeholders

from lmm_ray import cli

ROOT = Path(__file__).resolve().parents[1]
STUDY = ROOT / "sweeps" / "study_qwen2_5_vl_7b.yaml"
SMOKE = ROOT / "sweeps" / "smoke.yaml"


@pytest.fixture
def offline_home(tmp_path, monkeypatch):
    """The study sweep's ~/lmm_data files as placeholders, no network."""
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    write_placeholders(yaml.safe_load(STUDY.read_text()))


def _validate(capsys, path, *overrides) -> tuple[int, str, str]:
    rc = cli.main(["validate", str(path), "--offline", "--address", "ray://head:10001", *overrides])
    out, err = capsys.readouterr()
    return rc, out, err


def test_study_sweep_prints_the_memory_of_every_recipe(offline_home, capsys):
    rc, out, err = _validate(capsys, STUDY)
    assert rc == 0, err
    table = out[out.index("memory     GiB per GPU"):]
    assert "of 80 GiB" in table
    rows = {line.split()[0]: float(line.split()[-1]) for line in table.splitlines()[1:] if "fsdp x8:" in line}
    assert set(rows) >= {"sa_proj", "mlp_gate_up", "llm", "full", "lora"}
    # trainable parameters cost fp32 weights + gradients + AdamW moments: more of them, more memory
    assert rows["sa_proj"] < rows["mlp_gate_up"] < rows["llm"] < rows["full"] < 80


def test_ddp_that_cannot_fit_is_refused_with_the_fix(offline_home, capsys):
    rc, out, err = _validate(capsys, STUDY, "resources.strategy=ddp")
    assert rc == 2
    assert "resources.strategy: recipe 'mlp' needs about" in err and "the GPUs have 80 GiB" in err
    assert "fix: one of: fsdp over the same 8 workers" in err
    assert "Traceback" not in err


def test_a_budget_nothing_meets_is_refused(offline_home, capsys):
    rc, _, err = _validate(capsys, STUDY, "resources.gpu_memory_gb=8")
    assert rc == 2 and "the GPUs have 8 GiB" in err and "fix: one of: a GPU with more memory" in err


def test_auto_picks_ddp_where_it_fits_and_fsdp_where_not(offline_home, capsys):
    rc, out, err = _validate(capsys, STUDY, "resources.strategy=auto")
    assert rc == 0, err
    assert "sa_proj        ddp x8" in out and "full           fsdp x8" in out


def test_flash_attention_on_cpu_trials_is_refused(capsys, tmp_path):
    rc = cli.main(["validate", str(SMOKE), f"storage={tmp_path}", "train.attn_implementation=flash_attention_2"])
    err = capsys.readouterr().err
    assert rc == 2 and "train.attn_implementation" in err and "use sdpa" in err


def test_fsdp_on_a_family_without_blocks_is_refused(capsys, tmp_path, monkeypatch):
    from lmm_ray import families

    fam = families.FAMILIES.get("qwen2_5_vl")
    monkeypatch.setitem(families.FAMILIES._items, "qwen2_5_vl", dataclasses.replace(fam, blocks=()))
    rc = cli.main(["validate", str(SMOKE), f"storage={tmp_path}", "resources.strategy=fsdp",
                   "resources.num_workers=2", "resources.cpus_per_worker=0.5"])
    err = capsys.readouterr().err
    assert rc == 2 and "resources.strategy: FSDP cannot shard" in err and "use resources.strategy: ddp" in err


def test_memory_cli_is_a_user_facing_verb(capsys):
    assert cli.main(["memory", "Qwen/Qwen2.5-VL-7B-Instruct", "--recipe", "full", "--budget-gib", "80"]) == 0
    out = capsys.readouterr().out
    assert "does NOT fit a 80 GiB GPU" in out and "fsdp over 8 workers" in out
    assert cli.main(["memory", "Qwen/Qwen2.5-VL-7B-Instruct", "--recipe", "sa_proj", "--budget-gib", "80"]) == 0
    assert "fits a 80 GiB GPU" in capsys.readouterr().out
