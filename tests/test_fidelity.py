"""benchmarks/fidelity.py's measures on hand-made sweep results (the numbers are chosen so that each
verdict can be checked by hand)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pandas as pd
import pytest

_spec = importlib.util.spec_from_file_location("fidelity", Path(__file__).resolve().parents[1] / "benchmarks" / "fidelity.py")
fidelity = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fidelity)


def test_recovery_is_the_rise_above_the_lowest_earlier_stage():
    st = pd.DataFrame({"trial_id": ["a"] * 4 + ["b"] * 4, "stage": [0, 1, 2, 3] * 2,
                       "heldout_mean": [90, 60, 70, 65,  # a: falls to 60, back to 70 (+10), then 65 (+5)
                                        90, 80, 70, 60]})  # b: falls at every stage (best -10)
    rec = fidelity.recovery(st).set_index("trial_id")["recovery_pp"]
    assert rec["a"] == 10 and rec["b"] == -10


def test_matched_learning_interpolates_each_pair_where_both_reach():
    res = pd.DataFrame({
        "recipe": ["sa_proj", "sa_proj", "mlp_gate_up", "mlp_gate_up", "full", "full"],
        "learning": [10.0, 30.0, 20.0, 40.0, 25.0, 45.0],
        "heldout_change": [-2.0, -6.0, -10.0, -30.0, -20.0, -60.0],
    })
    rows = {(r["recipe"], r["versus"]): r for r in fidelity.matched(res)}
    assert set(rows) == {("sa_proj", "full"), ("mlp_gate_up", "full"), ("sa_proj", "mlp_gate_up")}  # no llm trials
    sa_full = rows["sa_proj", "full"]  # overlap 25..30 -> at 27.5: sa_proj -5.5, full -25
    assert sa_full["at"] == 27.5 and sa_full["heldout"] == pytest.approx(-5.5)
    assert sa_full["versus_heldout"] == pytest.approx(-25.0) and sa_full["as_study"]
    gu_sa = rows["sa_proj", "mlp_gate_up"]  # overlap 20..30 -> at 25: sa_proj -5, gate&up -15
    assert gu_sa["at"] == 25 and gu_sa["as_study"]
    res.loc[res["recipe"] == "sa_proj", "heldout_change"] = [-40.0, -80.0]  # now SA proj forgets most
    rows = {(r["recipe"], r["versus"]): r for r in fidelity.matched(res)}
    assert not rows["sa_proj", "full"]["as_study"] and not rows["sa_proj", "mlp_gate_up"]["as_study"]
    assert rows["mlp_gate_up", "full"]["as_study"]


def test_matched_learning_says_when_two_curves_do_not_overlap():
    res = pd.DataFrame({"recipe": ["sa_proj", "full"], "learning": [10.0, 30.0], "heldout_change": [-1.0, -9.0]})
    (row,) = fidelity.matched(res)
    assert row["at"] is None and row["range"] == {"sa_proj": (10.0, 10.0), "full": (30.0, 30.0)}


def test_a_folder_without_results_is_a_message_and_exit_2(tmp_path, capsys):
    assert fidelity.main([str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fidelity.py: error: no results.csv in ") and "Traceback" not in err


def test_a_sweep_without_finished_trials_is_a_message_and_exit_2(tmp_path, capsys):
    sweep = tmp_path / "s"
    sweep.mkdir()
    res = pd.DataFrame({"trial_id": ["a"], "status": ["failed"], "recipe": ["sa_proj"], "lr": [1e-3],
                        "learning": [float("nan")], "heldout_change": [float("nan")],
                        "counting_bias": [float("nan")], "kl_base": [float("nan")]})
    res.to_csv(sweep / "results.csv", index=False)
    pd.DataFrame({"trial_id": ["a"], "stage": [0], "skill": [""], "heldout_mean": [90.0]}).to_csv(sweep / "stages.csv", index=False)
    assert fidelity.main([str(sweep)]) == 2
    assert "no finished trial to measure yet" in capsys.readouterr().err
    assert fidelity.recovery(pd.DataFrame(columns=["trial_id", "stage", "heldout_mean"])).empty
