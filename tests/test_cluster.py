"""Running on a cluster: the deployment files, the study sweeps, and a real two-node Ray cluster.

1. sweeps/cluster/ray-up-gpu.yaml passes Ray's own cluster-config schema (what `ray up` checks).
2. sweeps/cluster/rayjob.yaml is a KubeRay RayJob whose entrypoint is a valid `lmm-ray` command
   naming a sweep file that exists, on a cluster that can host one of its trials.
3. The three study sweeps validate offline on the real 7-8B architectures (shipped configs in
   lmm_ray/hub_configs, parameters on the meta device: no weights, no network).
4. A real two-node Ray cluster on this machine (ray.cluster_utils.Cluster) runs a tiny sweep
   through `sweep.run(cfg, address=...)`, and the trials' Train workers sit on both nodes.
5. lmm_ray.cluster: check_cluster_resources and check_storage against that cluster (the positive storage
   case for real; the negative one with a patched per-node probe: on one machine every node sees
   every path).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import tempfile
import time
import uuid
from pathlib import Path

import pytest
from study_data import write_placeholders
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_DIR = ROOT / "sweeps" / "cluster"
RAY_UP = CLUSTER_DIR / "ray-up-gpu.yaml"
RAYJOB = CLUSTER_DIR / "rayjob.yaml"
STUDY_SWEEPS = {
    "study_qwen2_5_vl_7b.yaml": ("Qwen/Qwen2.5-VL-7B-Instruct", "qwen2_5_vl", 8.29e9),
    "study_llava_onevision_7b.yaml": ("llava-hf/llava-onevision-qwen2-7b-ov-hf", "llava_onevision", 8.03e9),
    "study_internvl.yaml": ("OpenGVLab/InternVL3-8B-hf", "internvl", 7.94e9),
}
STUDY_RECIPES = ["sa_proj", "sa_qkv", "mlp", "mlp_gate_up", "mlp_down", "llm", "vision", "projector", "full", "lora"]
STUDY_STAGES = ["cub200", "pixmocount", "pathvqa", "textvqa", "timeclock"]
STUDY_HELDOUT = ["ai2d", "chartqa", "docvqa", "infovqa", "realworldqa", "seedbench", "scienceqa", "mmstar"]


# ---------------------------------------------------------------------------------------------
# 1. ray up


def _gpu_count(x) -> float:
    return float(x or 0)


def test_ray_up_config_passes_rays_schema():
    import ray
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load(RAY_UP.read_text())
    cfg = prepare_config(raw)  # fills provider defaults as `ray up` does
    validate_config(cfg)  # Ray's JSON schema + node-type consistency; raises on any problem

    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert _gpu_count(head["resources"].get("GPU")) == 0, "the head must be a CPU node (no GPU)"
    gpu_types = [t for t, v in types.items() if _gpu_count(v.get("resources", {}).get("GPU")) > 0]
    assert gpu_types, "a GPU worker type is needed"
    assert ray.__version__ in cfg["docker"]["image"], "the image must pin the client's Ray version"
    setup = "\n".join(cfg.get("setup_commands", []))
    assert "pip install -e" in setup, "the package is installed from the file-mounted repository"
    mounts = cfg.get("file_mounts", {})
    assert any(Path(ROOT / local).resolve() == ROOT for local in mounts.values() if not str(local).startswith("/")), mounts

    # One trial of the study sweep fits the cluster at its autoscaling limits.
    from lmm_ray import cluster, config

    # (the same reading check_resources does of ~/ray_bootstrap_config.yaml on a `ray up` head)
    study = config.load_sweep(ROOT / "sweeps" / "study_qwen2_5_vl_7b.yaml")
    groups = cluster._ray_up_groups(RAY_UP)
    assert groups == [({"CPU": 8.0, "GPU": 0.0}, 1), ({"CPU": 96.0, "GPU": 8.0}, 2)]
    slots = cluster.worker_slots(cluster._expand(groups, 99), cluster.worker_bundle(study), 0.01)
    assert slots == 2 * study.resources.num_workers == 16, "two trials at once: search.max_concurrent 2"


# ---------------------------------------------------------------------------------------------
# 2. KubeRay RayJob


def _lmm_ray_args(entrypoint: str) -> list[str]:
    """The arguments after `lmm-ray` in a shell command line (up to a shell separator)."""
    tokens = shlex.split(entrypoint)
    assert "lmm-ray" in tokens, f"the entrypoint does not run lmm-ray: {entrypoint!r}"
    args = tokens[tokens.index("lmm-ray") + 1:]
    for sep in ("&&", "||", ";", "|"):
        if sep in args:
            args = args[: args.index(sep)]
    return args


def _k8s_quantity(v) -> float:
    s = str(v)
    return float(s[:-1]) / 1000 if s.endswith("m") else float(s)


def test_rayjob_manifest_runs_a_valid_sweep():
    from lmm_ray import cli, cluster, config

    job = yaml.safe_load(RAYJOB.read_text())
    assert job["apiVersion"] == "ray.io/v1"
    assert job["kind"] == "RayJob"
    spec = job["spec"]
    rc = spec["rayClusterSpec"]
    assert rc["headGroupSpec"]["template"]["spec"]["containers"], "a head group is needed"
    import ray

    for c in [rc["headGroupSpec"]["template"]["spec"]["containers"][0]] + \
             [g["template"]["spec"]["containers"][0] for g in rc["workerGroupSpecs"]]:
        assert ray.__version__ in c["image"], f"pin Ray {ray.__version__}: {c['image']}"
    gpu_groups = [g for g in rc["workerGroupSpecs"]
                  if _gpu_count(g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu")) > 0]
    assert gpu_groups, "a GPU worker group is needed"

    args = _lmm_ray_args(spec["entrypoint"])
    parsed = cli.build_parser().parse_args(args)
    assert parsed.cmd == "sweep"
    assert parsed.address is None, "inside a Ray job the driver reads RAY_ADDRESS; no --address"
    sweep_file = ROOT / parsed.sweep
    assert sweep_file.is_file(), f"the entrypoint names {parsed.sweep}, which is not in the repository"
    cfg = config.load_sweep(sweep_file, parsed.overrides)  # overrides are valid keys and values
    assert cfg.resources.gpus_per_worker >= 1

    # One trial fits the RayJob's cluster (pods as nodes: CPU and nvidia.com/gpu limits).
    head_limits = rc["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    nodes = [{"CPU": _k8s_quantity(head_limits["cpu"]), "GPU": float(rc["headGroupSpec"]["rayStartParams"].get("num-gpus", 0))}]
    for g in gpu_groups:
        lim = g["template"]["spec"]["containers"][0]["resources"]["limits"]
        nodes += [{"CPU": _k8s_quantity(lim["cpu"]), "GPU": float(lim["nvidia.com/gpu"])}] * int(g.get("maxReplicas", g["replicas"]))
    assert nodes[0]["GPU"] == 0, "the head runs no training: num-gpus 0"
    assert cluster.worker_slots(nodes, cluster.worker_bundle(cfg), 0.01) >= cfg.resources.num_workers


# ---------------------------------------------------------------------------------------------
# 3. Study sweeps, offline


@pytest.mark.parametrize("name", list(STUDY_SWEEPS))
def test_study_sweep_validates_offline(name, tmp_path, monkeypatch, capsys):
    """No weights, no network: the hub model's shipped configuration, parameters on the meta device.
    The user's converted LLaVA files live under ~/lmm_data: HOME points at a folder holding
    one-record placeholders for them (validation opens them and their images)."""
    from lmm_ray import cli

    model, family, n_params = STUDY_SWEEPS[name]
    path = ROOT / "sweeps" / name
    raw = yaml.safe_load(path.read_text())
    assert raw["model"] == model
    assert [s["name"] for s in raw["stages"]] == STUDY_STAGES
    assert [h["name"] for h in raw["heldout"]] == STUDY_HELDOUT
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    local = write_placeholders(raw)  # validate opens the files: one valid record each, and its image
    assert local and all(p == "~/lmm_data" or p.startswith("~/lmm_data/") for p in local), local

    # --address: the sweep is for a cluster; validate then leaves resources to the cluster check
    # (it never connects: --offline). Without it, 8 GPU workers would not fit this machine.
    rc = cli.main(["validate", str(path), "--offline", "--address", "ray://cluster-head:10001"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "valid (offline" in out
    assert f"model      {model} ({family})" in out
    assert "cub200 (1.0 epochs) -> pixmocount (1.0 epochs) -> pathvqa (1.0 epochs) -> textvqa (1.0 epochs) -> timeclock" in out
    trainable = {m.group(1): int(m.group(2).replace(",", "")) for m in re.finditer(r"(\w+) \(([\d,]+) trainable\)", out)}
    assert list(trainable) == STUDY_RECIPES
    assert trainable["full"] == pytest.approx(n_params, rel=0.01)  # the real model's size
    assert trainable["sa_proj"] < trainable["mlp_gate_up"] < trainable["mlp"] < trainable["llm"] < trainable["full"]
    assert "8 worker(s) x 8 CPU + 1 GPU per trial (fsdp)" in out


HUB_CONFIGS = {
    "Qwen/Qwen2.5-VL-7B-Instruct": ("qwen2_5_vl", 8.29e9),
    "Qwen/Qwen2.5-VL-3B-Instruct": ("qwen2_5_vl", 3.75e9),
    "llava-hf/llava-onevision-qwen2-7b-ov-hf": ("llava_onevision", 8.03e9),
    "OpenGVLab/InternVL3-8B-hf": ("internvl", 7.94e9),
}


@pytest.mark.parametrize("ref", list(HUB_CONFIGS))
def test_shipped_hub_config_has_the_real_size(ref, monkeypatch):
    from lmm_ray import models

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    family, n = HUB_CONFIGS[ref]
    fam, cfg = models.model_config(ref, offline=True)
    assert (fam.name, cfg.model_type) == (family, family)
    meta = models.meta_model(fam, cfg)
    assert sum(p.numel() for p in meta.parameters()) == pytest.approx(n, rel=0.005)
    assert json.loads((models.HUB_CONFIGS / (ref.replace("/", "--") + ".json")).read_text())["model_type"] == family


# ---------------------------------------------------------------------------------------------
# 4-5. A real two-node cluster


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_nodes():
    """A head node and a second node, 1 CPU each, on this machine. Ray's temp dir (and with it the
    `ray_current_cluster` address file) is private, so another process's plain `ray.init()` on
    this shared machine never connects to this cluster."""
    import ray
    from ray.cluster_utils import Cluster

    tmp = tempfile.mkdtemp(prefix="lrc")  # short: Ray's socket paths must stay < 108 characters
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_TMPDIR", tmp)
        mp.setenv("OMP_WAIT_POLICY", "PASSIVE")
        mp.delenv("RAY_ADDRESS", raising=False)
        # Free ports: other Ray instances on this machine may hold the defaults (8265, 52365).
        cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 1, "object_store_memory": 100 * 2**20,
            "include_dashboard": True, "dashboard_port": _free_port(),  # State API: Train cleanup, list_actors
            "dashboard_agent_listen_port": None,
        })
        try:
            cluster.add_node(num_cpus=1, object_store_memory=100 * 2**20)
            cluster.wait_for_nodes()
            yield cluster
        finally:
            if ray.is_initialized():
                ray.shutdown()
            cluster.shutdown()
            shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture
def connected(two_nodes):
    import ray

    ray.init(address=two_nodes.address, log_to_driver=False)
    try:
        yield two_nodes
    finally:
        ray.shutdown()


def _node_ids(two_nodes) -> set[str]:
    return {n.node_id for n in [two_nodes.head_node, *two_nodes.worker_nodes]}


def _smoke(tmp_path: Path, *extra: str):
    from lmm_ray import config

    return config.load_sweep(ROOT / "sweeps" / "smoke.yaml", [
        f"storage={tmp_path / 'runs'}", f"name=cluster-{uuid.uuid4().hex[:8]}", *extra])


def test_sweep_runs_on_two_nodes(two_nodes, tmp_path):
    """Two trials at once, one Train worker each. A worker takes 0.6 CPU, so a 1-CPU node holds one
    worker: the two workers must use both nodes (the trial drivers hold no CPU)."""
    import ray
    from ray.util.state import list_actors

    from lmm_ray import base, sweep

    base.ensure("base:qwen2_5_vl@ci", quiet=True)  # built once per machine (~1.5 min), then cached
    cfg = _smoke(tmp_path, "search.num_trials=2", "search.max_concurrent=2", "stages.0.steps=5", "stages.1.steps=5",
                 "resources.num_workers=1", "resources.cpus_per_worker=0.6", "resources.max_failures=0")
    t0 = time.time()
    res, st = sweep.run(cfg, address=two_nodes.address)
    took = time.time() - t0
    assert not ray.is_initialized(), "sweep.run disconnects when it is done"
    assert list(res["status"]) == ["finished", "finished"], res[["trial_id", "status", "reason"]].to_string()
    assert set(st["stage"]) == {0, 1, 2}
    assert (Path(cfg.sweep_dir) / "results.csv").is_file()

    # Where did the Train workers run? The State API keeps dead actors (with their node).
    ray.init(address=two_nodes.address, log_to_driver=False)
    try:
        deadline = time.time() + 30  # the State API lists dead actors a little after they end (slower under load)
        while True:
            workers = list_actors(address=f"http://{two_nodes.webui_url}", filters=[("class_name", "=", "RayTrainWorker")],
                                  detail=True, limit=1000, raise_on_missing_output=False)
            if len(workers) >= 2 or time.time() > deadline:
                break
            time.sleep(2)
    finally:
        ray.shutdown()
    nodes = {w.node_id for w in workers}
    assert len(workers) >= 2, workers
    assert nodes == _node_ids(two_nodes), f"Train workers ran on {nodes}, cluster nodes are {_node_ids(two_nodes)}"
    # Both trials checkpointed into the one storage folder every node writes to.
    ckpts = list((Path(cfg.sweep_dir) / "train").glob("*/checkpoint_*"))
    assert len({c.parent.name for c in ckpts}) == 2, ckpts
    print(f"two-node sweep: {took:.0f} s, workers on {len(nodes)} nodes")


def test_check_resources_on_the_cluster(connected, tmp_path, monkeypatch, capsys):
    from lmm_ray import cluster, config

    ok = [("resources.num_workers=2", "resources.cpus_per_worker=0.6"),  # one worker per node
          ("resources.num_workers=1", "resources.cpus_per_worker=0.99"),
          # the trial driver holds no CPU (cluster.TRIAL_DRIVER_RESOURCES): both nodes whole for 2 x 1 CPU
          ("resources.num_workers=2", "resources.cpus_per_worker=1"),
          ("resources.num_workers=4", "resources.cpus_per_worker=0.5")]
    for overrides in ok:
        cluster.check_cluster_resources(_smoke(tmp_path, *overrides))

    bad = {
        ("resources.num_workers=3", "resources.cpus_per_worker=1", "train.batch_size=9"): "at most 2 such workers fit",
        ("resources.num_workers=5", "resources.cpus_per_worker=0.5", "train.batch_size=10"): "at most 4 such workers fit",
        ("resources.num_workers=1", "resources.cpus_per_worker=2"): "no node has 2 CPU for a single worker",
        ("resources.num_workers=1", "resources.gpus_per_worker=1"): "no node has 1 CPU + 1 GPU",
    }
    for overrides, words in bad.items():
        with pytest.raises(cluster.ClusterError) as e:
            cluster.check_cluster_resources(_smoke(tmp_path, *overrides), wait_s=0)
        msg = str(e.value)
        assert e.value.field == "resources.num_workers"
        assert words in msg, msg
        assert "fix: lower resources.num_workers" in msg

    # Nodes may still be joining: it waits (here 1 s) before it gives up.
    t0 = time.monotonic()
    with pytest.raises(cluster.ClusterError):
        cluster.check_cluster_resources(_smoke(tmp_path, "resources.num_workers=5", "resources.cpus_per_worker=0.5",
                                               "train.batch_size=10"), wait_s=1)
    assert time.monotonic() - t0 >= 1
    assert "waiting up to 1 s for nodes to join" in capsys.readouterr().err

    # On a `ray up` head the autoscaler's limits count: the 8-GPU study trial fits the GPU nodes
    # that ray-up-gpu.yaml can start, though none is up (this CPU cluster stands in for its head).
    monkeypatch.setattr(cluster, "RAY_UP_CONFIG", str(RAY_UP))
    study = config.load_sweep(ROOT / "sweeps" / "study_qwen2_5_vl_7b.yaml")
    cluster.check_cluster_resources(study, wait_s=0)
    with pytest.raises(cluster.ClusterError) as e:
        cluster.check_cluster_resources(_smoke(tmp_path, "resources.num_workers=17", "resources.gpus_per_worker=1",
                                       "resources.cpus_per_worker=8", "train.batch_size=17"), wait_s=0)
    assert "at most 16 such workers fit (even at its autoscaling limits)" in str(e.value)

    # An autoscaler it cannot read: the user can skip the check.
    monkeypatch.setattr(cluster, "RAY_UP_CONFIG", str(tmp_path / "absent.yaml"))
    monkeypatch.setenv(cluster.SKIP_RESOURCE_CHECK, "1")
    cluster.check_cluster_resources(study, wait_s=0)


def test_check_storage_on_the_cluster(connected, tmp_path, monkeypatch):
    from lmm_ray import cluster

    sweep_dir = tmp_path / "runs" / "s1"
    assert len(cluster.alive_nodes()) == 2
    # For real: both nodes read the marker the driver wrote (one machine, one filesystem).
    cluster.check_storage(str(sweep_dir))
    assert sweep_dir.is_dir() and not list(sweep_dir.glob(cluster.MARKER_PREFIX + "*")), "the marker is removed"

    # The real probe reports what a node without the file sees.
    assert cluster._sees_marker(str(tmp_path / "nope"), "t")[:2] == (False, "the file does not exist on this node")

    # A node-local folder: the second node cannot see the marker (simulated: per-node probe patched).
    head = connected.head_node.node_id
    seen = {}

    def probe(marker, token, node_ids, timeout_s):
        seen.update(marker=marker, nodes=set(node_ids))
        assert Path(marker).read_text() == token, "the driver wrote the marker before probing"
        return {nid: (True, "ok", "head") if nid == head else (False, "the file does not exist on this node", "node2")
                for nid in node_ids}

    monkeypatch.setattr(cluster, "_probe_nodes", probe)
    local = tmp_path / "node-local" / "s2"
    with pytest.raises(cluster.ClusterError) as e:
        cluster.check_storage(str(local))
    msg = str(e.value)
    assert e.value.field == "storage"
    assert seen["nodes"] == _node_ids(connected), "every alive node is probed"
    assert str(local) in msg and "is not shared: 1 of 2 nodes" in msg and "host node2" in msg
    assert "fix:" in msg and "s3://" in msg and "gs://" in msg and "same path" in msg
    assert not Path(seen["marker"]).exists(), "the marker is removed when the check fails too"

    # Object storage and single-node clusters are not probed.
    def refuse(*a, **k):
        raise AssertionError("no probe expected")

    monkeypatch.setattr(cluster, "_probe_nodes", refuse)
    cluster.check_storage("s3://bucket/sweeps/s3")
    cluster.check_storage("gs://bucket/sweeps/s3")
    monkeypatch.setattr(cluster, "alive_nodes", lambda: [{"NodeID": head, "Alive": True}])
    cluster.check_storage(str(local))


def _load_quickstart():
    from lmm_ray.config import load_sweep

    return load_sweep(Path(__file__).resolve().parents[1] / "sweeps" / "quickstart.yaml")


def test_local_ray_start_gets_a_second_try_then_a_clear_error(monkeypatch, capsys):
    """Ray's start-up waits are fixed; a busy machine that misses them once is retried, and one that
    misses them twice gets a ClusterError (exit 2, what to do) instead of Ray's bare Exception."""
    import ray

    from lmm_ray import sweep
    from lmm_ray.errors import ClusterError

    calls = []

    def failing_init(**kw):
        calls.append(kw["dashboard_port"])
        raise Exception("\nThe current node timed out during startup. This could happen because ...")

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    monkeypatch.setattr(ray, "init", failing_init)
    with pytest.raises(ClusterError) as e:
        sweep.init_ray(_load_quickstart())
    assert len(calls) == 2 and calls[0] != calls[1]  # a fresh dashboard port for the second try
    assert "timed out during startup" in str(e.value) and "--address" in str(e.value)
    assert "trying once more" in capsys.readouterr().err

    calls.clear()
    outcomes = [Exception("Failed to start the dashboard"), None]

    def flaky_init(**kw):
        calls.append(kw["dashboard_port"])
        if outcomes.pop(0) is not None:
            raise Exception("Failed to start the dashboard")

    monkeypatch.setattr(ray, "init", flaky_init)
    sweep.init_ray(_load_quickstart())
    assert len(calls) == 2


def test_two_sweeps_started_in_the_same_second_stage_their_driver_files_apart(tmp_path, monkeypatch):
    """Ray stages a Tune run's driver files in <session>/artifacts/<start second>/tune: the same
    folder for two sweeps started in the same second on one cluster. Inside own_staging_folder each
    sweep's folder carries its name and driver pid; outside it, Ray's own second is back."""
    import ray.train._internal.storage as S

    from lmm_ray.cluster import own_staging_folder

    monkeypatch.setattr(S, "_get_ray_train_session_dir", lambda: str(tmp_path / "artifacts"))

    def staging(name=None):
        if name is None:
            return S.StorageContext(storage_path=str(tmp_path), experiment_dir_name="tune").experiment_driver_staging_path
        with own_staging_folder(name):
            return S.StorageContext(storage_path=str(tmp_path), experiment_dir_name="tune").experiment_driver_staging_path

    a, b, plain = staging("multi"), staging("asha"), staging()
    assert a != b and f"_multi_{os.getpid()}/tune/" in a and f"_asha_{os.getpid()}/tune/" in b, (a, b)
    assert re.fullmatch(r".*/artifacts/\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d/tune/driver_artifacts", plain), plain
