"""Checks that need the Ray cluster a sweep runs on: run right after connecting, before any trial.

    init_ray(cfg, address)
    cluster.check_cluster_resources(cfg)  # one trial fits on the cluster (or on what it can scale to)
    cluster.check_storage(cfg.sweep_dir)  # every node sees the sweep folder (multi-node, local path)

It also owns what one trial asks of a cluster: `worker_bundle` (one Ray Train worker) and
`TRIAL_DRIVER_RESOURCES` (the Tune trial function that drives it). Both checks raise
`ClusterError` (a ConfigError: the CLI prints it as `field: problem` + `fix:` and exits with code 2), so a sweep that cannot work fails in seconds instead of hanging on a placement group
or failing at its first checkpoint (Ray Train writes checkpoints from every node into
`storage_path` and does not sync local folders between nodes).
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
import sys
import time
import uuid
from pathlib import Path

from lmm_ray.errors import ClusterError
from lmm_ray.schema import is_uri

MARKER_PREFIX = ".lmm_ray_storage_check-"
PROBE_TIMEOUT_S = 120.0
NODE_WAIT_S = 60.0  # nodes of a fixed-size cluster may still be joining when the sweep starts
RAY_UP_CONFIG = "~/ray_bootstrap_config.yaml"  # the autoscaler's config on a `ray up` head node
SKIP_RESOURCE_CHECK = "LMM_RAY_SKIP_RESOURCE_CHECK"
_EPS = 1e-6


def alive_nodes() -> list[dict]:
    """`ray.nodes()` entries of the nodes that are alive (needs a connected driver)."""
    import ray

    return [n for n in ray.nodes() if n.get("Alive")]


# ---------------------------------------------------------------------------------------------
# Resources


# The trial function only waits on its TorchTrainer. Ray refuses an empty resource request, and a
# sliver of a CPU (0.01, as before) makes two 1-CPU trials need 2.02 CPUs of a 2-CPU machine, so
# they never ran at once. One byte of `memory`, a resource every Ray node has, holds no core.
TRIAL_DRIVER_RESOURCES = {"memory": 1}

# The object store of a local Ray (sweep.init_ray): Ray's default (30% of RAM in /dev/shm) is far
# more than trials need; validate counts it against the machine's free memory.
LOCAL_OBJECT_STORE_BYTES = 256 * 2**20


def worker_bundle(resources) -> dict[str, float]:
    """The resources of one Ray Train worker of a trial (a ResourcesConfig, or a SweepConfig)."""
    r = getattr(resources, "resources", resources)
    bundle = {"CPU": float(r.cpus_per_worker)}
    if r.gpus_per_worker:
        bundle["GPU"] = float(r.gpus_per_worker)
    return bundle


def _fits(have: dict, bundle: dict) -> int:
    """How many copies of `bundle` fit into `have` (0 if one does not)."""
    n = math.inf
    for k, need in bundle.items():
        if need > 0:
            n = min(n, math.floor(float(have.get(k, 0.0)) / need + _EPS))
    return 0 if n is math.inf else int(n)


def worker_slots(nodes: list[dict], bundle: dict, driver_cpu: float = 0.0) -> int:
    """How many workers of `bundle` the nodes (each a resource dict) can hold at once, with the
    trial's driver (`driver_cpu`) placed on the node where it costs the fewest workers."""
    if not nodes:
        return 0
    per_node = [_fits(n, bundle) for n in nodes]
    total = sum(per_node)
    if driver_cpu <= 0:
        return total
    best = -1
    for i, n in enumerate(nodes):
        if float(n.get("CPU", 0.0)) + _EPS < driver_cpu:
            continue
        reduced = {**n, "CPU": float(n.get("CPU", 0.0)) - driver_cpu}
        best = max(best, total - per_node[i] + _fits(reduced, bundle))
    return max(best, 0)


def _v2_groups() -> list[tuple[dict, int]] | None:
    """[(node resources, max count)] from the cluster config an autoscaler reports to the GCS
    (KubeRay and autoscaler v2); the private source Train V2 itself checks before it waits for
    workers (worker_group.py). None when nothing was reported."""
    try:
        import ray._private.state as state

        config = state.state.get_cluster_config()
    except Exception:  # noqa: BLE001 - a private API; without it, judge by other sources
        return None
    if config is None or not config.node_group_configs:
        return None
    return [({k: float(v) for k, v in g.resources.items()}, 10**6 if int(g.max_count) < 0 else int(g.max_count))
            for g in config.node_group_configs]


def _ray_up_groups(path: str | os.PathLike = RAY_UP_CONFIG) -> list[tuple[dict, int]] | None:
    """[(node resources, max count)] from a `ray up` cluster config (on the head node, where job
    drivers run, `ray up` leaves it at ~/ray_bootstrap_config.yaml). None if absent or if a node
    type leaves its resources to auto-detection (then its size is unknown here)."""
    import yaml

    p = Path(os.path.expanduser(str(path)))
    try:
        raw = yaml.safe_load(p.read_text()) if p.is_file() else None
    except (OSError, yaml.YAMLError):
        return None
    types = (raw or {}).get("available_node_types") or {}
    groups = []
    for name, t in types.items():
        res = (t or {}).get("resources") or {}
        if not res:
            return None
        count = 1 if name == raw.get("head_node_type") else int(t.get("max_workers", raw.get("max_workers", 0)))
        groups.append(({k: float(v) for k, v in res.items()}, count))
    return groups or None


def _autoscaler_groups() -> list[tuple[dict, int]] | None:
    """What the cluster can grow to, when that can be read (KubeRay/autoscaler v2, or ray up)."""
    return _v2_groups() or _ray_up_groups(RAY_UP_CONFIG)


def _expand(groups: list[tuple[dict, int]], cap: int) -> list[dict]:
    return [res for res, count in groups for _ in range(min(count, cap))]


def _describe(nodes: list[dict]) -> str:
    parts = []
    for n in nodes:
        res = n.get("Resources", {})
        shown = ", ".join(f"{k} {res[k]:g}" for k in ("CPU", "GPU") if res.get(k))
        parts.append(f"{n.get('NodeManagerAddress', '?')} ({shown or 'no CPU/GPU'})")
    return "; ".join(parts)


def check_cluster_resources(cfg, *, wait_s: float = NODE_WAIT_S) -> None:
    """Raise ClusterError unless the connected cluster can host one trial: `num_workers` workers of
    (cpus_per_worker CPU + gpus_per_worker GPU), each on a single node, plus the trial driver's
    sliver of a CPU. Passes if the alive nodes can hold it, or if the cluster's autoscaling limits
    can (when readable: KubeRay/autoscaler v2, or a `ray up` head). Otherwise waits up to `wait_s`
    for nodes that are still joining. LMM_RAY_SKIP_RESOURCE_CHECK=1 skips the check (an
    autoscaler whose limits cannot be read here)."""
    if os.environ.get(SKIP_RESOURCE_CHECK, "").strip() not in ("", "0"):
        return
    r = cfg.resources
    bundle = worker_bundle(cfg)
    driver = float(TRIAL_DRIVER_RESOURCES.get("CPU", 0.0))
    deadline = time.monotonic() + wait_s
    told = False
    while True:
        nodes = alive_nodes()
        have = worker_slots([n.get("Resources", {}) for n in nodes], bundle, driver)
        if have >= r.num_workers:
            return
        groups = _autoscaler_groups()
        if groups is not None:
            pool = _expand(groups, r.num_workers + 1)
            have = worker_slots(pool, bundle, driver)
            if have >= r.num_workers:
                return  # the autoscaler adds the nodes when the trial asks for them
            break
        if time.monotonic() >= deadline:
            break
        if not told:
            print(f"[lmm_ray] the cluster cannot hold a trial yet; waiting up to {wait_s:.0f} s for nodes to join ...",
                  file=sys.stderr, flush=True)
            told = True
        time.sleep(min(5.0, max(0.0, deadline - time.monotonic())))
    need = " + ".join(f"{v:g} {k}" for k, v in bundle.items())
    pool = pool if groups is not None else [n.get("Resources", {}) for n in nodes]
    biggest = max((_fits(res, bundle) for res in pool), default=0)
    why = f"no node has {need} for a single worker" if biggest == 0 else f"at most {have} such workers fit"
    raise ClusterError(
        "resources.num_workers",
        f"a trial needs {r.num_workers} workers x ({need})" + (f" plus {driver:g} CPU for its driver" if driver else "")
        + ", but on this cluster "
        f"{why}{' (even at its autoscaling limits)' if groups is not None else ''}. Nodes: {_describe(nodes) or 'none'}",
        "lower resources.num_workers, resources.cpus_per_worker or resources.gpus_per_worker, or give the cluster "
        "more or larger nodes (ray up: available_node_types.*.max_workers; KubeRay: workerGroupSpecs replicas). "
        f"If it adds nodes on demand in a way this check cannot read, set {SKIP_RESOURCE_CHECK}=1",
    )


def _gpu_total_gib() -> float:
    import torch

    return torch.cuda.get_device_properties(0).total_memory / 2**30


def gpu_memory_gib(timeout_s: float = 60.0) -> float | None:
    """The memory of one of the cluster's GPUs (a one-GPU task reads it), or None when no GPU task
    ran within `timeout_s` (every GPU busy, or an autoscaler still starting one)."""
    import ray

    ref = ray.remote(num_gpus=1, num_cpus=0, max_retries=0)(_gpu_total_gib).remote()
    ready, _ = ray.wait([ref], timeout=timeout_s)
    if not ready:
        ray.cancel(ref, force=True)
        return None
    return float(ray.get(ref))


# ---------------------------------------------------------------------------------------------
# Storage


def _sees_marker(marker: str, token: str) -> tuple[bool, str, str]:
    """(ok, detail, host): runs on one node and reads the marker file the driver wrote."""
    host = socket.gethostname()
    try:
        text = Path(marker).read_text()
    except FileNotFoundError:
        return False, "the file does not exist on this node", host
    except OSError as e:
        return False, f"cannot read it: {e}", host
    if text.strip() != token:
        return False, "a different file is at that path on this node", host
    return True, "ok", host


def _probe_nodes(marker: str, token: str, node_ids: list[str], timeout_s: float) -> dict[str, tuple[bool, str, str]]:
    """{node id: (ok, detail, host)}: `_sees_marker` run once on every node (hard node affinity)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    probe = ray.remote(num_cpus=0, max_retries=0)(_sees_marker)
    refs = {nid: probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(nid, soft=False),
                               name="lmm_ray.check_storage").remote(marker, token)
            for nid in node_ids}
    ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout_s)
    done = set(ready)
    out = {}
    for nid, ref in refs.items():
        if ref not in done:
            ray.cancel(ref, force=True)
            out[nid] = (False, f"the check did not run within {timeout_s:.0f} s", "?")
            continue
        try:
            out[nid] = tuple(ray.get(ref))
        except Exception as e:  # noqa: BLE001 - report whatever stopped the probe on that node
            out[nid] = (False, f"the check failed there: {type(e).__name__}: {str(e).splitlines()[0][:200]}", "?")
    return out


def check_storage(sweep_dir: str, *, timeout_s: float = PROBE_TIMEOUT_S) -> None:
    """Raise ClusterError if the sweep folder is a local path that some node of the cluster cannot
    see. Only checked with more than one alive node and a non-URI path: the driver writes a marker
    file into `sweep_dir` and a tiny task on every node reads it back."""
    if is_uri(sweep_dir):
        return
    nodes = alive_nodes()
    if len(nodes) <= 1:
        return
    folder = Path(sweep_dir)
    token = uuid.uuid4().hex
    marker = folder / f"{MARKER_PREFIX}{token}"
    fix = ("put `storage` on a filesystem that every node mounts at the same path (NFS, EFS, a Kubernetes "
           "ReadWriteMany volume), or use object storage: storage: s3://bucket/path or gs://bucket/path")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        marker.write_text(token)
    except OSError as e:
        raise ClusterError("storage", f"cannot write into the sweep folder {sweep_dir}: {e}", fix) from None
    try:
        results = _probe_nodes(str(marker), token, [n["NodeID"] for n in nodes], timeout_s)
    finally:
        marker.unlink(missing_ok=True)
    address = {n["NodeID"]: n.get("NodeManagerAddress", "?") for n in nodes}
    bad = {nid: res for nid, res in results.items() if not res[0]}
    if not bad:
        return
    lines = "; ".join(f"node {nid[:12]} ({address.get(nid, '?')}, host {res[2]}): {res[1]}" for nid, res in bad.items())
    raise ClusterError(
        "storage",
        f"the sweep folder {sweep_dir} is not shared: {len(bad)} of {len(nodes)} nodes cannot see a file the driver "
        f"wrote there ({lines}). Ray Train writes checkpoints from every node into it and does not copy local folders "
        f"between nodes",
        fix,
    )


@contextlib.contextmanager
def own_staging_folder(sweep_name: str):
    """Ray 2.60 stages a Tune run's driver files (experiment state, searcher state, trial results
    before they sync to storage) in `<ray session>/artifacts/<the second it started>/<experiment>`,
    and every sweep's experiment is `tune` (the folder in its storage). Two sweeps started in the
    same second on one cluster shared that folder and synced each other's trials into their storage
    (one then hung on the other's trial). Ray reads the timestamp from `ray.tune.utils.date_str`
    when the run starts; inside this block it also carries the sweep's name and this driver's pid."""
    import ray.tune.utils as tune_utils

    second = tune_utils.date_str
    tune_utils.date_str = lambda: f"{second()}_{sweep_name}_{os.getpid()}"
    try:
        yield
    finally:
        tune_utils.date_str = second


__all__ = ["ClusterError", "TRIAL_DRIVER_RESOURCES", "alive_nodes", "worker_bundle", "worker_slots", "check_cluster_resources",
           "check_storage", "own_staging_folder"]
