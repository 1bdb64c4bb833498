"""Shared fixtures: CPU/offline settings, a session cache of tiny models, an independent role oracle.

Set before anything imports torch or huggingface_hub (both read them once, at load):
- OMP_WAIT_POLICY=PASSIVE: the 2 cores are shared with other tenants' jobs; with OpenMP's default
  spin-waiting, 2 torch threads made one tiny train step take 4.6 s instead of 0.05 s.
- HF_HUB_OFFLINE=1: the hub is unreachable; without it a hub-id lookup retries for ~25 s.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import copy  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny():
    """`tiny(family)` -> the session's shared `models.Loaded` tiny model of that family (seed 0),
    in eval mode. Shared by every test: never train or `recipes.apply` it in place; use `tiny_copy`.
    """
    from lmm_ray import models

    cache: dict[str, object] = {}

    def get(family: str):
        if family not in cache:
            cache[family] = models.build_tiny(family)
            cache[family].model.eval()
        return cache[family]

    return get


@pytest.fixture
def tiny_copy(tiny):
    """`tiny_copy(family)` -> a Loaded whose model is a deep copy of the cached one (free to mutate)."""
    from lmm_ray.models import Loaded

    def get(family: str):
        src = tiny(family)
        return Loaded(copy.deepcopy(src.model), src.processor, src.family, src.ref)

    return get


# ---------------------------------------------------------------------------------------------
# An oracle written with plain string logic, independent of families.py's regexes and of
# recipes.resolve/classify: what each parameter *is*, and what each study recipe must train.

_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")
_LLM_LAYERS = "model.language_model.layers."


class Oracle:
    @staticmethod
    def is_llm(name: str) -> bool:
        return name.startswith("model.language_model.") or name.startswith("lm_head.")

    @staticmethod
    def is_vision(family: str, name: str) -> bool:
        if family == "qwen2_5_vl":
            return name.startswith("model.visual.") and not name.startswith("model.visual.merger.")
        return name.startswith("model.vision_tower.")

    @staticmethod
    def is_projector(family: str, name: str) -> bool:
        if family == "qwen2_5_vl":
            return name.startswith("model.visual.merger.")
        return name.startswith("model.multi_modal_projector.") or name == "model.image_newline"

    @staticmethod
    def layer(name: str) -> int | None:
        """LLM decoder layer index, or None for anything outside `model.language_model.layers.N.`."""
        if not name.startswith(_LLM_LAYERS):
            return None
        idx = name[len(_LLM_LAYERS):].split(".")[0]
        return int(idx) if idx.isdigit() else None

    @classmethod
    def role(cls, family: str, name: str) -> str:
        """The role a parameter must have (the study's table in DESIGN.md section 4); 'other' if none."""
        if cls.is_projector(family, name):
            return "projector"
        if cls.is_vision(family, name):
            return "vision"
        if name == "lm_head.weight":
            return "llm.head"
        if name == "model.language_model.embed_tokens.weight":
            return "llm.embed"
        if name == "model.language_model.norm.weight":
            return "llm.norm"
        if cls.layer(name) is not None:
            p = name.split(".")  # model language_model layers N <block> [<proj>] <weight|bias>
            if len(p) == 7 and p[4] == "self_attn" and p[5] in _ATTN and p[6] in ("weight", "bias"):
                return "llm.attn." + p[5][0]
            if len(p) == 7 and p[4] == "mlp" and p[5] in _MLP and p[6] in ("weight", "bias"):
                return "llm.mlp." + p[5][: -len("_proj")]
            if len(p) == 6 and p[4] in ("input_layernorm", "post_attention_layernorm") and p[5] == "weight":
                return "llm.norm"
        return "other"

    # What each of the study's recipes trains, as predicates over (family, parameter name).
    # `lora` trains no base parameter: its adapters are checked through `lora_modules`.
    @classmethod
    def recipe_predicates(cls) -> dict:
        def roles(*rs):
            return lambda f, n: cls.role(f, n) in rs

        attn = ("llm.attn.q", "llm.attn.k", "llm.attn.v", "llm.attn.o")
        mlp = ("llm.mlp.gate", "llm.mlp.up", "llm.mlp.down")
        return {
            "sa_proj": roles(*attn),
            "sa_qkv": roles(*attn[:3]),
            "mlp": roles(*mlp),
            "mlp_gate_up": roles(*mlp[:2]),
            "mlp_down": roles(mlp[2]),
            "llm": lambda f, n: cls.is_llm(n),
            "vision": cls.is_vision,
            "projector": cls.is_projector,
            "full": lambda f, n: True,
            "lora": lambda f, n: False,
            "lwf": roles(*mlp),
            "wise_ft": roles(*mlp),
        }

    LORA_ROLES = {"lora": ("llm.mlp.gate", "llm.mlp.up", "llm.mlp.down")}

    @classmethod
    def expected_names(cls, recipe: str, family: str, names) -> set[str]:
        preds = cls.recipe_predicates()
        if recipe not in preds:
            raise AssertionError(f"tests/conftest.py Oracle has no expectation for recipe {recipe!r}: add one")
        return {n for n in names if preds[recipe](family, n)}

    @classmethod
    def lora_modules(cls, recipe: str, family: str, named_params) -> dict[str, tuple[int, int]]:
        """{module name: (out_features, in_features)} of the Linear modules a LoRA recipe adapts."""
        roles = cls.LORA_ROLES.get(recipe, ())
        return {
            n[: -len(".weight")]: tuple(p.shape)
            for n, p in named_params
            if n.endswith(".weight") and p.dim() == 2 and cls.role(family, n) in roles
        }


@pytest.fixture(scope="session")
def oracle() -> type[Oracle]:
    return Oracle


# ---------------------------------------------------------------------------------------------
# Trials on the tiny pre-trained base (train tests, sweep tests)

CI_BASE = "base:qwen2_5_vl@ci"
SMALL_TARGETS = ("count", "clock", "species", "texture", "read_word")


@pytest.fixture(scope="session")
def ci_base():
    """Path of the cached `base:qwen2_5_vl@ci` folder (built once, ~1.5-3 min, if not cached)."""
    from lmm_ray import base

    return base.ensure(CI_BASE, quiet=True)


@pytest.fixture(scope="session")
def small_spec(ci_base):
    """`small_spec(recipe="sa_proj", lr=1e-3, stages=2, steps=4, heldout=("color", "shape"), train=..., eval=...,
    **TrialSpec fields)` -> a TrialSpec on the ci base that runs in seconds: `stages` target skills from
    SMALL_TARGETS, `steps` steps each, batch 8 from a pool of 64, 8 eval samples per skill.
    `train` / `eval` dicts are merged over those small defaults; other keywords set TrialSpec fields."""
    from lmm_ray import recipes
    from lmm_ray.config import HeldoutConfig, StageConfig
    from lmm_ray.schema import EvalConfig, TrainConfig
    from lmm_ray.trial import TrialSpec

    def make(recipe: str = "sa_proj", lr: float = 1e-3, stages: int = 2, steps: int = 4,
             heldout=("color", "shape"), train: dict | None = None, eval: dict | None = None, **fields) -> TrialSpec:
        if not 1 <= stages <= len(SMALL_TARGETS):
            raise ValueError(f"small_spec: stages must be 1..{len(SMALL_TARGETS)}")
        return TrialSpec(
            model=CI_BASE,
            recipe=recipes.get_recipe(recipe),
            lr=lr,
            stages=tuple(StageConfig(t, skill=t, steps=steps) for t in SMALL_TARGETS[:stages]),
            heldout=tuple(HeldoutConfig(h, skill=h) for h in heldout),
            train=TrainConfig(**{"batch_size": 8, "n_train": 64, **(train or {})}),
            eval=EvalConfig(**{"n_per_skill": 8, "batch_size": 16, **(eval or {})}),
            **fields,
        )

    return make


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_train_autoscaling_coordinator(address: str) -> None:
    """Start the cluster's (detached) AutoscalingCoordinator actor now. Each Ray Train run asks it
    for resources with a 5 s time-out (ray/train/v2/.../autoscaling_coordinator_client.py); the
    first run on a cluster also waits for the actor's process to start, and on a loaded machine
    that took longer, so Ray logged a "Failed to send resource request" traceback into the
    sweep's console (which test_sweep checks is free of tracebacks)."""
    import ray
    from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (
        get_or_create_autoscaling_coordinator,
    )

    ray.init(address=address, log_to_driver=False, logging_level="WARNING")
    try:
        ray.get(get_or_create_autoscaling_coordinator().__ray_ready__.remote(), timeout=300)
    finally:
        ray.shutdown()


@pytest.fixture(scope="session")
def ray_cluster():
    """The session's one local Ray cluster, started on first use and shared by every test that does
    not need a Ray of its own. `.address` (GCS host:port) is what a test passes on: `ray.init(address=)`
    in this process (the `ray_local` fixture), `sweep.run(cfg, address=)`, or `--address` on an
    `lmm-ray sweep|train` subprocess. Starting a Ray costs 5-15 s here (more under load), and before
    this fixture every sweep and trainer in the suite started one.

    Fixed and private, so that it behaves the same on any machine and never mixes with another Ray:
    - 2 CPUs whatever the machine has: trials, worker counts and `resources_per_worker` in the tests
      are sized for 2 (a 1-CPU trial worker per sweep lets two sweeps share it side by side);
    - its own temp dir (RAY_TMPDIR, as in test_cluster's two_nodes): the `ray_current_cluster`
      address file is private, so a plain `ray.init()` elsewhere (another test run, a local sweep)
      never connects to it;
    - dashboard on a free port, and RAY_API_SERVER_ADDRESS pointing at it in the environment the
      raylet (and so every worker) inherits: Train V2 frees a stopped trial's workers through the
      State API, which otherwise scans the machine and fails when it finds several Rays;
    - the settings of `sweep.worker_env()` (quiet Ray Train, HF offline, passive OpenMP) in that
      environment too, for drivers that connect without a runtime_env.

    Who keeps a Ray of its own: tests that kill Ray's own processes or a driver with its cluster
    (test_sweep's kill-and-resume, fault tests that kill a raylet/GCS), tests of resource refusals
    or of multi-node placement (test_cluster's two-node cluster), and tests of how `init_ray` starts
    a local Ray. Killing a Train *worker* (test_train_ray, test_fsdp_trials) is fine here: Ray
    restarts it inside this cluster. A test that connects in-process must disconnect when it is done
    (`ray_local` does, per module), or a later in-process `sweep.run(address=...)` would silently
    reuse the connection (init_ray returns early when Ray is initialized)."""
    import shutil
    import tempfile
    from types import SimpleNamespace

    from ray.cluster_utils import Cluster

    from lmm_ray.sweep import worker_env

    tmp = tempfile.mkdtemp(prefix="lrs")  # short: Ray's socket paths must stay < 108 characters
    port = _free_port()
    dashboard = f"http://127.0.0.1:{port}"
    with pytest.MonkeyPatch.context() as mp:  # the environment of the processes started below only
        mp.setenv("RAY_TMPDIR", tmp)
        mp.delenv("RAY_ADDRESS", raising=False)
        for k, v in {**worker_env(), "RAY_API_SERVER_ADDRESS": dashboard}.items():
            mp.setenv(k, v)
        # Up to 3 tries: Ray gives a new node 30 s (fixed in ray/_private/node.py) to register, and
        # on this shared machine at load average ~100 it did not make it once; every test of an
        # xdist worker that uses this fixture then errors. A failed try's processes end with this
        # process (Ray's own exit hook).
        for attempt in range(3):
            try:
                cluster = Cluster(initialize_head=True, head_node_args={
                    "num_cpus": 2, "object_store_memory": 256 * 2**20,
                    "include_dashboard": True, "dashboard_host": "127.0.0.1", "dashboard_port": port,
                    "dashboard_agent_listen_port": None,  # a free one: other Rays on this machine hold the default
                })
                break
            except Exception as e:  # noqa: BLE001 - Ray raises a bare Exception for this time-out
                if attempt == 2 or "timed out during startup" not in str(e):
                    raise
                port = _free_port()
                dashboard = f"http://127.0.0.1:{port}"
                mp.setenv("RAY_API_SERVER_ADDRESS", dashboard)
    _start_train_autoscaling_coordinator(cluster.address)
    try:
        yield SimpleNamespace(address=cluster.address, dashboard=dashboard, cluster=cluster)
    finally:
        cluster.shutdown()  # only this cluster's processes (never `ray stop`: it ends every Ray of the user)
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def ray_local(ray_cluster):
    """This process connected to the session's `ray_cluster` for one test module (trainers built
    in-process: TorchTrainer(...).fit()); disconnected at the module's end, the cluster stays up."""
    import ray

    from lmm_ray.sweep import worker_env

    assert not ray.is_initialized(), "a test left this process connected to a Ray: disconnect (ray.shutdown()) when done"
    ray.init(address=ray_cluster.address, runtime_env={"env_vars": worker_env()}, log_to_driver=True,
             logging_level="WARNING")
    try:
        yield ray
    finally:
        ray.shutdown()


# ---------------------------------------------------------------------------------------------
# Order: the long Ray modules first. Under `make test` (pytest-xdist, `-n 3 --dist loadfile
# --no-loadscope-reorder`: each
# module runs whole on one worker, so its module fixtures - sweeps, trainers - run once) the
# suite's wall time is that of its longest chain; started first, these run side by side while
# the many short tests fill the gaps. Without xdist the order changes nothing but the order.
# xdist hands each worker two modules at the start, in this order (worker 1 gets the 1st and 4th,
# ...): test_pareto (seconds) is 4th so that the longest, test_sweep, is not followed by another long one.
LONG_MODULES = ("test_sweep.py", "test_cluster.py", "test_fsdp_trials.py", "test_pareto.py", "test_lmms_backend.py",
                "test_train_ray.py", "test_final.py", "test_base_reproducible.py", "test_parallel.py")


def pytest_collection_modifyitems(session, config, items):
    rank = {name: i for i, name in enumerate(LONG_MODULES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONG_MODULES)))  # stable: the rest keep their order
