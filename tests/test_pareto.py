import itertools
import math

import numpy as np
import optuna
import pandas as pd
import pytest
import yaml

from lmm_ray import pareto
from lmm_ray.results import load_results
from lmm_ray.pareto import (
    OBJECTIVES,
    export_recipe,
    format_table,
    front,
    front_hypervolume,
    hypervolume,
    pareto_mask,
    pick,
    plot_stages,
    plot_tradeoff,
)


def brute_front(points, senses):
    """Independent O(n^2) definition: i is on the front unless some j is no worse everywhere and
    strictly better somewhere; rows with NaN are off the front."""
    n, d = len(points), len(senses)

    def better(a, b, k):
        return a[k] > b[k] if senses[k] == "max" else a[k] < b[k]

    def no_worse(a, b, k):
        return a[k] >= b[k] if senses[k] == "max" else a[k] <= b[k]

    out = []
    for i in range(n):
        if any(math.isnan(v) for v in points[i]):
            out.append(False)
            continue
        dominated = any(
            all(no_worse(points[j], points[i], k) for k in range(d))
            and any(better(points[j], points[i], k) for k in range(d))
            for j in range(n)
            if j != i
        )
        out.append(not dominated)
    return np.array(out)


def random_sets(rng, count=60):
    for t in range(count):
        d = 2 if t % 2 else 3
        n = int(rng.integers(1, 40))
        senses = [str(s) for s in rng.choice(["max", "min"], size=d)]
        if t % 3 == 0:  # small integers: many ties on single coordinates and exact duplicates
            pts = rng.integers(0, 4, size=(n, d)).astype(float)
        else:
            pts = rng.normal(size=(n, d))
            if n > 2:  # force ties on one coordinate and some exact duplicates
                pts[1, 0] = pts[0, 0]
                pts[2] = pts[0]
        yield pts, senses


def test_pareto_mask_matches_brute_force():
    rng = np.random.default_rng(0)
    for pts, senses in random_sets(rng):
        assert np.array_equal(pareto_mask(pts, senses), brute_front(pts.tolist(), senses)), (pts, senses)


def test_pareto_mask_duplicates_and_nan():
    pts = np.array([[1.0, 1.0], [1.0, 1.0], [0.0, 0.0], [np.nan, 5.0], [2.0, 0.5]])
    assert pareto_mask(pts, ["max", "max"]).tolist() == [True, True, False, False, True]
    with pytest.raises(ValueError, match="valid"):
        pareto_mask(pts, ["max", "up"])


def test_front_matches_optuna_best_trials():
    rng = np.random.default_rng(1)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    dist = {"x": optuna.distributions.FloatDistribution(0, 1)}
    for rep in range(6):
        n = 30
        vals = rng.integers(0, 5, size=(n, 3)).astype(float) if rep % 2 else rng.normal(size=(n, 3))
        vals[1] = vals[0]  # an exact duplicate: optuna keeps every copy on the front, as we do
        study = optuna.create_study(directions=["maximize", "maximize", "minimize"])
        for v in vals:
            study.add_trial(optuna.trial.create_trial(params={"x": 0.5}, distributions=dist, values=list(v)))
        results = pd.DataFrame(vals, columns=["learning", "heldout_change", "counting_bias"])
        results["status"] = "finished"
        results["trial_id"] = [str(i) for i in range(n)]
        ours = set(front(results).index)
        theirs = {t.number for t in study.best_trials}
        assert ours == theirs
        assert (0 in theirs) == (1 in theirs)


# --- hypervolume ------------------------------------------------------------------------------


def test_hypervolume_2d_by_hand():
    # staircase: 1*3 + 1*2 + 1*1 = 6
    assert hypervolume([[1, 3], [2, 2], [3, 1]], [0, 0], ["max", "max"]) == pytest.approx(6)
    # same set mirrored to minimisation against ref (4, 4)
    assert hypervolume([[3, 1], [2, 2], [1, 3]], [4, 4], ["min", "min"]) == pytest.approx(6)
    # mixed senses: maximise x, minimise y against ref (0, 4): points (1,1),(2,3) -> 1*3 + 1*1 = 4
    assert hypervolume([[1, 1], [2, 3]], [0, 4], ["max", "min"]) == pytest.approx(4)
    # a dominated point and points not strictly better than ref add nothing
    assert hypervolume([[1, 3], [2, 2], [3, 1], [1, 1], [5, 0], [-1, 9]], [0, 0], ["max"] * 2) == pytest.approx(6)
    assert hypervolume(np.empty((0, 2)), [0, 0], ["max"] * 2) == 0.0


def test_hypervolume_3d_by_hand():
    # two unit-ish boxes from the origin: A = [0,2]x[0,1]x[0,1] (vol 2), B = [0,1]x[0,2]x[0,1]
    # (vol 2), overlap [0,1]^2x[0,1] (vol 1) -> 3; C = [0,1]x[0,1]x[0,3] adds 3 minus its overlap
    # with A u B, which is [0,1]^2x[0,1] (vol 1) -> 3 + 2 = 5
    pts = [[2, 1, 1], [1, 2, 1], [1, 1, 3]]
    assert hypervolume(pts, [0, 0, 0], ["max"] * 3) == pytest.approx(5)
    # the same boxes in the (max, max, min) orientation used by the sweep: z -> 3 - z, ref z = 3
    pts_min = [[2, 1, 2], [1, 2, 2], [1, 1, 0]]
    assert hypervolume(pts_min, [0, 0, 3], ["max", "max", "min"]) == pytest.approx(5)
    # a point equal to ref on one axis is ignored
    assert hypervolume(pts + [[9, 9, 0]], [0, 0, 0], ["max"] * 3) == pytest.approx(5)
    # duplicates change nothing
    assert hypervolume(pts + pts, [0, 0, 0], ["max"] * 3) == pytest.approx(5)


def test_hypervolume_4d_inclusion_exclusion():
    rng = np.random.default_rng(3)
    pts = rng.uniform(0.1, 1, size=(6, 4))
    expected = 0.0  # inclusion-exclusion over subsets: boxes from the origin intersect in their min
    for k in range(1, len(pts) + 1):
        for sub in itertools.combinations(pts, k):
            expected += (-1) ** (k + 1) * np.prod(np.min(sub, axis=0))
    assert hypervolume(pts, np.zeros(4), ["max"] * 4) == pytest.approx(expected)


def test_hypervolume_monte_carlo_3d():
    rng = np.random.default_rng(2)
    pts = rng.uniform(0, 1, size=(25, 3))
    ref = np.array([0.0, 0.0, 1.0])  # third objective minimised
    senses = ["max", "max", "min"]
    exact = hypervolume(pts, ref, senses)
    samples = rng.uniform(size=(200_000, 3))  # the unit cube bounds every dominated region
    covered = np.zeros(len(samples), dtype=bool)
    for p in pts:
        covered |= (samples[:, 0] <= p[0]) & (samples[:, 1] <= p[1]) & (samples[:, 2] >= p[2])
    assert exact == pytest.approx(covered.mean(), rel=0.02)


# --- results tables -------------------------------------------------------------------------------


def table():
    rows = [
        # trial, status, recipe, lr, learning, heldout, bias
        ("a", "finished", "sa_proj", 1e-4, 25.0, -0.5, 0.01),
        ("b", "finished", "mlp_gate_up", 1e-4, 30.0, -2.0, 0.02),
        ("c", "finished", "llm", 1e-4, 32.0, -23.0, 0.20),
        ("d", "finished", "projector", 1e-4, 3.0, -1.5, 0.05),  # dominated by a
        ("e", "stopped", "full", 1e-4, 50.0, 5.0, -0.1),  # dominates everything, but stopped
        ("f", "failed", "vision", 1e-3, 60.0, 9.0, -0.2),
        ("g", "finished", "sa_qkv", 3e-5, 25.0, -0.5, 0.01),  # duplicate of a
    ]
    df = pd.DataFrame(rows, columns=["trial_id", "status", "recipe", "lr", "learning", "heldout_change", "counting_bias"])
    df["target_forgetting"] = -1.0
    df["objective"] = df["learning"] + 2 * df["heldout_change"].clip(upper=0) - 10 * df["counting_bias"]
    df["trainable_share"] = 0.05
    df["param/lora_rank"] = [np.nan, np.nan, np.nan, np.nan, 8.0, np.nan, np.nan]
    return df


def test_front_excludes_stopped_and_failed():
    f = front(table())
    assert list(f["trial_id"]) == ["c", "b", "a", "g"]  # learning descending
    assert front_hypervolume(table()) == 0.0  # every finished trial forgets: nothing beats base
    better = table()
    better.loc[:, "heldout_change"] = [1.0, 2.0, 0.5, 0.0, 9.0, 9.0, 1.0]
    assert front_hypervolume(better) == 0.0  # still: every bias rose, base is not beaten on it
    better.loc[:, "counting_bias"] = [-0.01, -0.02, 0.2, -0.05, -1, -1, -0.01]
    # a=(25,1,-.01) b=(30,2,-.02) beat base; c has more bias and d ties base on held-out: ignored.
    # b dominates a here, so the volume is b's box alone: 30 * 2 * 0.02
    assert front_hypervolume(better) == pytest.approx(30 * 2 * 0.02)


def test_pick_modes():
    df = table()
    assert pick(df, "max-learning")["trial_id"] == "c"
    assert pick(df, "min-forgetting")["trial_id"] == "a"  # a and g tie; a comes first
    # knee: normalised over the front (c, b, a, g): b = (30-25)/7, (23-2)/22.5, (.2-.02)/.19 ->
    # distance to (1,1,1) ~ 0.30; a: (0, 1, 1) -> 1.0; c: (1, 0, 0) -> 1.41
    assert pick(df, "knee")["trial_id"] == "b"
    tied = df.copy()
    tied.loc[tied.trial_id == "g", "heldout_change"] = -0.5
    tied.loc[tied.trial_id == "g", "learning"] = 26.0  # g now dominates a
    assert pick(tied, "min-forgetting")["trial_id"] == "g"


def test_pick_errors():
    with pytest.raises(ValueError, match="knee, max-learning, min-forgetting"):
        pick(table(), "best")
    stopped = table().assign(status="stopped")
    with pytest.raises(ValueError, match="no finished trial"):
        pick(stopped, "knee")


def test_format_table():
    df = table()
    text = format_table(df, front_ids=front(df)["trial_id"])
    lines = text.splitlines()
    assert "held-out change" in lines[0] and "counting bias" in lines[0] and "trainable %" in lines[0]
    assert len(lines) == len(df) + 1
    marked = [ln for ln in lines[1:] if ln.lstrip().startswith("*")]
    assert len(marked) == 4 and not any("full" in ln or "projector" in ln for ln in marked)
    assert "1e-4" in text and "3e-5" in text and "stopped" in text
    assert "+25.0" in text
    assert pareto._fmt_lr(9.99996e-5) == "1e-4" and pareto._fmt_lr(2.5e-4) == "2.5e-4"
    assert format_table(df.iloc[:0]) == "(no trials)"


# --- plots -----------------------------------------------------------------------------------------


def assert_png(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 5000


def test_plot_tradeoff(tmp_path):
    assert_png(plot_tradeoff(table(), tmp_path / "many.png"))
    one = table().assign(recipe="sa_proj", status="finished")
    assert_png(plot_tradeoff(one, tmp_path / "one.png"))


def stage_table():
    skills = ["", "cub200", "pixmocount", "pathvqa"]
    rows = []
    for tid, drops in [("a", [0, 0.3, -0.2, 0.1]), ("b", [0, -1, -4, -2]), ("c", [0, -0.5, -9.8])]:
        for s, drop in enumerate(drops):
            rows.append({"trial_id": tid, "stage": s, "skill": skills[s], "heldout_mean": 76.4 + drop})
    return pd.DataFrame(rows)


def test_plot_stages(tmp_path):
    out = plot_stages(stage_table(), ["a", "b", "c"], ["sa_proj lr=1e-4", "mlp lr=1e-4", "llm lr=1e-4"], tmp_path / "s.png")
    assert_png(out)
    with pytest.raises(ValueError, match="zz"):
        plot_stages(stage_table(), ["zz"], None, tmp_path / "x.png")


# --- export and load ----------------------------------------------------------------------------


def test_export_roundtrip(tmp_path):
    row = {"trial_id": "t7", "status": "finished", "recipe": "lora", "lr": 0.1 + 0.2,
           "param/lora_rank": np.int64(8), "param/alpha": np.float64(1 / 3), "param/layers": "16-27",
           "param/unused": np.nan, "learning": 25.123456, "heldout_change": -0.6, "counting_bias": 0.01}
    got = export_recipe(row, tmp_path / "r.yaml", sweep="quick")
    text = (tmp_path / "r.yaml").read_text()
    loaded = yaml.safe_load(text)
    assert loaded == got
    assert got == {"recipe": "lora", "lr": 0.1 + 0.2, "lora_rank": 8, "alpha": 1 / 3, "layers": "16-27"}
    assert type(loaded["lora_rank"]) is int and loaded["lr"] == 0.30000000000000004
    assert text.startswith("#") and "t7" in text and "quick" in text


def test_export_tiny_lr_from_results_row(tmp_path):
    df = table()
    df.loc[0, "lr"] = 3.0000000000000004e-05
    got = export_recipe(df.iloc[0], tmp_path / "r.yaml")
    assert yaml.safe_load((tmp_path / "r.yaml").read_text()) == got
    assert got["lr"] == 3.0000000000000004e-05 and "lora_rank" not in got


def test_load_results(tmp_path):
    with pytest.raises(FileNotFoundError, match="may not have finished"):
        load_results(tmp_path)
    table().to_csv(tmp_path / "results.csv", index=False)
    stage_table().to_csv(tmp_path / "stages.csv", index=False)
    results, stages = load_results(tmp_path)
    assert list(results["trial_id"]) == list("abcdefg")
    assert (stages.loc[stages.stage == 0, "skill"] == "").all()
    # the conditional int param came back as ints, so its export says 8, not 8.0
    assert export_recipe(results.iloc[4], tmp_path / "e.yaml")["lora_rank"] == 8
    assert list(front(results)["trial_id"]) == ["c", "b", "a", "g"]
    assert OBJECTIVES[2] == ("counting_bias", "min")


# --- reference point, id columns, one colour per recipe --------------------------------------------


def test_hypervolume_against_a_chosen_reference():
    df = table()  # every finished trial forgets, so against the base (0, 0, 0) the volume is 0
    assert front_hypervolume(df) == 0.0
    ref = {"learning": 0.0, "heldout_change": -50.0, "counting_bias": 0.2}
    # front a=(25,-.5,.01) b=(30,-2,.02) c=(32,-23,.2: ties the bias bound, adds nothing) g=a
    # boxes a: 25 x 49.5 x 0.19, b: 30 x 48 x 0.18, overlapping in 25 x 48 x 0.18
    expected = 25 * 49.5 * 0.19 + 30 * 48 * 0.18 - 25 * 48 * 0.18
    assert front_hypervolume(df, ref=ref) == pytest.approx(expected)
    assert front_hypervolume(df, ref=[0, -50, 0.2]) == pytest.approx(expected)
    assert pareto.format_reference(ref) == "learning 0, held-out change -50, counting bias +0.2"


def test_tables_carry_the_trial_ids():
    df = table().assign(optuna_trial=range(7))
    text = format_table(df, front_ids=front(df)["trial_id"])
    head, first = text.splitlines()[:2]
    assert head.split()[:4] == ["*", "trial", "optuna", "recipe"] and first.split()[:4] == ["*", "a", "0", "sa_proj"]
    md = pareto.format_markdown(df, front_ids=front(df)["trial_id"]).splitlines()
    assert md[0].startswith("| Pareto | trial | optuna | recipe | lr | learning |") and md[1].startswith("|---|")
    assert md[2].startswith("| ✓ | a | 0 | sa_proj | 1e-4 | +25.00 |")  # pp to 2 decimals


def test_one_colour_per_recipe_in_both_plots(tmp_path):
    df = table()
    colours = pareto.recipe_colours(df["recipe"])
    assert colours == pareto.recipe_colours(reversed(list(df["recipe"])))  # order-independent
    assert len(set(colours.values())) == len(colours) == df["recipe"].nunique()
    many = pareto.recipe_colours([f"r{i}" for i in range(12)])  # beyond tab10: still one colour each
    assert len({tuple(c) for c in many.values()}) == 12
    assert_png(plot_tradeoff(df, tmp_path / "t.png", colours=colours))
    out = plot_stages(stage_table(), ["a", "b"], ["sa_proj lr=1e-4", "mlp_gate_up lr=1e-4"], tmp_path / "s.png",
                      colours=[colours["sa_proj"], colours["mlp_gate_up"]], title="the 2 Pareto-optimal trials of 7")
    assert_png(out)


def test_cli_pareto_prints_ids_and_the_reference(tmp_path, capsys):
    import json

    from lmm_ray import cli

    table().assign(optuna_trial=range(7)).to_csv(tmp_path / "results.csv", index=False)
    stage_table().to_csv(tmp_path / "stages.csv", index=False)
    (tmp_path / "sweep.json").write_text(json.dumps({"name": "x", "objective": {"reference_heldout_change": -30.0}}))
    assert cli.main(["pareto", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[1].split()[:3] == ["*", "trial", "optuna"]
    assert "reference point (learning 0, held-out change -30, counting bias +0.2" in out  # the sweep's, printed
    assert cli.main(["pareto", str(tmp_path), "--json", "--reference", "heldout_change=-50"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["reference"] == {"learning": 0.0, "heldout_change": -50.0, "counting_bias": 0.2}
    assert got["hypervolume"] == pytest.approx(front_hypervolume(table(), ref=got["reference"])) and got["hypervolume"] > 0
    assert cli.main(["pareto", str(tmp_path), "--reference", "bias=1"]) == 2
