"""`lmm-ray recipes`: the JSON and text tables against independently computed counts, errors
with exit code 2, and the installed console script."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lmm_ray import cli
from lmm_ray.families import FAMILIES
from lmm_ray.recipes import RECIPES

FAMS = FAMILIES.names()


def _expected_table(oracle, family, model) -> dict:
    """{recipe: {"trainable", "total", "roles"}} from named_parameters() and the oracle alone."""
    params = dict(model.named_parameters())
    total = sum(p.numel() for p in params.values())
    table = {}
    for recipe in RECIPES.names():
        roles: dict[str, int] = {}
        for n in oracle.expected_names(recipe, family, params):
            role = oracle.role(family, n)
            roles[role] = roles.get(role, 0) + params[n].numel()
        adapters = 0
        lora = oracle.lora_modules(recipe, family, params.items())
        for module, (out_f, in_f) in lora.items():
            count = RECIPES.get(recipe).lora.rank * (out_f + in_f)
            role = oracle.role(family, module + ".weight")
            roles[role] = roles.get(role, 0) + count
            adapters += count
        table[recipe] = {"trainable": sum(roles.values()), "total": total + adapters, "roles": roles}
    return table


def _run(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("family", FAMS)
def test_recipes_json_equals_independent_counts(capsys, tiny, oracle, family):
    code, out, err = _run(capsys, "recipes", "--family", family, "--json")
    assert code == 0, err
    table = json.loads(out)  # exactly one JSON document on stdout
    assert list(table) == RECIPES.names()
    for recipe, row in table.items():
        assert set(row) == {"trainable", "total", "roles"}
        assert all(isinstance(v, int) for v in [row["trainable"], row["total"], *row["roles"].values()])
    assert table == _expected_table(oracle, family, tiny(family).model)
    assert table["full"]["trainable"] == table["full"]["total"]


def test_recipes_text_table_has_one_line_per_recipe(capsys, tiny, oracle):
    code, out, err = _run(capsys, "recipes", "--family", "llava_onevision")
    assert code == 0, err
    lines = out.splitlines()
    expected = _expected_table(oracle, "llava_onevision", tiny("llava_onevision").model)
    total = expected["full"]["total"]
    assert lines[0] == f"# tiny:llava_onevision (llava_onevision): {total:,} parameters"
    assert lines[1].split()[:3] == ["recipe", "trainable", "share"]
    rows = lines[2:]
    assert [r.split()[0] for r in rows] == RECIPES.names()
    for row in rows:
        name, trainable, share = row.split()[:3]
        assert trainable == f"{expected[name]['trainable']:,}"
        assert share == f"{100 * expected[name]['trainable'] / expected[name]['total']:.2f}%"
    header = lines[1].split()
    sa = dict(zip(header, rows[RECIPES.names().index("sa_proj")].split()))
    assert sa["vision"] == "-" and sa["projector"] == "-" and sa["llm.mlp.up"] == "-"
    assert sa["llm.attn.q"] == f"{expected['sa_proj']['roles']['llm.attn.q']:,}"


def test_recipes_filter_custom_file_and_model_ref(capsys, tmp_path, tiny):
    f = tmp_path / "mine.yaml"
    f.write_text("head_only:\n  roles: [llm.head]\n")
    code, out, err = _run(capsys, "recipes", "--family", "internvl", "--recipe", "sa_qkv",
                          "--recipe", "head_only", "--recipe-file", str(f), "--json")
    assert code == 0, err
    table = json.loads(out)
    assert list(table) == ["sa_qkv", "head_only"]
    head = tiny("internvl").model.lm_head.weight.numel()
    assert table["head_only"]["roles"] == {"llm.head": head} and table["head_only"]["trainable"] == head
    # a saved folder goes through model_config + meta_model and gives the same numbers
    tiny("internvl").save(tmp_path / "m")
    code, out2, err = _run(capsys, "recipes", "--model", str(tmp_path / "m"), "--recipe", "sa_qkv", "--json")
    assert code == 0, err
    assert json.loads(out2)["sa_qkv"] == table["sa_qkv"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--recipe", "sa_prj"], r"unknown recipe 'sa_prj'\. Did you mean 'sa_proj'\?.*Valid choices: .*wise_ft"),
        (["--family", "qwen2_5vl"], r"unknown model family 'qwen2_5vl'\. Did you mean 'qwen2_5_vl'\?"),
        (["--recipe-file", "/no/such/recipes.yaml"], r"recipe file '/no/such/recipes.yaml' does not exist"),
    ],
)
def test_recipes_user_errors_exit_2_with_a_message(capsys, argv, message):
    import re

    code, out, err = _run(capsys, "recipes", *argv)
    assert code == cli.EXIT_USAGE == 2
    assert out == ""
    assert err.startswith("lmm-ray recipes: error: ") and len(err.strip().splitlines()) == 1
    assert re.search(message, err), err
    assert "Traceback" not in err


def test_unknown_recipe_exits_2_from_the_command_line(capsys):
    """`sys.exit(main())` (what the console script does) exits with 2."""
    with pytest.raises(SystemExit) as e:
        sys.exit(cli.main(["recipes", "--recipe", "mlp_gateup"]))
    assert e.value.code == 2
    assert "Did you mean 'mlp_gate_up'?" in capsys.readouterr().err


def test_console_script_entry_point(tiny, oracle):
    exe = shutil.which("lmm-ray", path=str(Path(sys.executable).parent)) or shutil.which("lmm-ray")
    assert exe, "the lmm-ray console script is not installed"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([exe, "recipes", "--family", "internvl", "--json"], capture_output=True, text=True,
                          timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == _expected_table(oracle, "internvl", tiny("internvl").model)
