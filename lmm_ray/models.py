"""Load a model + processor from a hub id, a local `save_pretrained` folder, `tiny:<family>` or
`base:<family>[@preset]`.

Hub ids and local folders share one code path (`from_pretrained` accepts both). Processors are
always built explicitly, never through `AutoProcessor`: without torchvision every video
processor fails to import, and `AutoProcessor` on such a folder silently returns the bare
tokenizer. We build an image-only subclass of the family's processor instead.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lmm_ray.errors import UserError
from lmm_ray.families import Family, TinySize, family_of_config, get_family

_IMAGE_ONLY: dict[type, type] = {}


def image_only(cls: type) -> type:
    """A subclass of a processor class whose `__init__` has no `video_processor` argument.

    `ProcessorMixin` reads the attributes it manages off the `__init__` signature, so dropping
    the argument makes the processor image + text only. The family's own arguments must stay
    explicit parameters (transformers saves and reloads only those it finds in `__init__`'s
    signature and code), so the `__init__` is generated from the parent's signature.
    """
    if cls in _IMAGE_ONLY:
        return _IMAGE_ONLY[cls]
    import inspect

    params = [p for n, p in inspect.signature(cls.__init__).parameters.items() if n != "self"]
    if "video_processor" not in [p.name for p in params]:
        _IMAGE_ONLY[cls] = cls
        return cls
    kept = [p for p in params if p.name != "video_processor" and p.kind is p.POSITIONAL_OR_KEYWORD]
    defaults = {p.name: (None if p.default is p.empty else p.default) for p in kept}
    args = ", ".join(f"{p.name}=_defaults[{p.name!r}]" for p in kept)
    call = ", ".join(f"{p.name}={p.name}" for p in kept)
    src = f"def __init__(self, {args}, **kwargs):\n    _parent.__init__(self, video_processor=None, {call}, **kwargs)\n"
    ns: dict = {"_defaults": defaults, "_parent": cls}
    exec(src, ns)  # noqa: S102 - generated from the parent's own signature
    _IMAGE_ONLY[cls] = type("ImageOnly" + cls.__name__, (cls,), {"__init__": ns["__init__"]})
    return _IMAGE_ONLY[cls]


@dataclass
class Loaded:
    model: Any
    processor: Any
    family: Family
    ref: str

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    def save(self, path: str | os.PathLike) -> None:
        """A folder `from_pretrained` (and `load_model`) reads back: model, tokenizer, processor."""
        self.model.save_pretrained(path)
        self.processor.save_pretrained(path)


def build_processor(family: Family, tokenizer, size: TinySize):
    cls = image_only(family.processor_class)
    return cls(
        image_processor=family.build_image_processor(size),
        tokenizer=tokenizer,
        chat_template=tokenizer.chat_template,
        **family.processor_kwargs(size),
    )


def build_tiny(family_name: str, size: TinySize = TinySize(), seed: int = 0) -> Loaded:
    """An untrained tiny model of a family, with its local tokenizer and processor."""
    from lmm_ray.tokenizer import build_tokenizer

    family = get_family(family_name)
    tok = build_tokenizer(family.image_placeholder, family.tokenizer_specials)
    torch.manual_seed(seed)
    model = family.build_tiny(tok, size)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    return Loaded(model, build_processor(family, tok, size), family, f"tiny:{family_name}")


def load_pretrained(path_or_id: str, *, dtype: torch.dtype | None = None, attn_implementation: str | None = None) -> Loaded:
    """A hub id or a local folder saved with `save_pretrained`: the same code path for both."""
    from transformers import AutoConfig

    path_or_id = local_ref(path_or_id)
    if not os.path.isdir(path_or_id):
        ensure_reachable(path_or_id)  # a missing id fails in one request, not transformers' ~30 s of retries
    try:
        config = AutoConfig.from_pretrained(path_or_id)
    except (OSError, ValueError) as e:
        where = "a local folder without config.json" if os.path.isdir(path_or_id) else "not a local folder"
        raise ValueError(
            f"cannot load model {path_or_id!r}: {where}, and not a reachable hub id ({e.__class__.__name__}). "
            "Use a folder written by save_pretrained, a hub id on a machine that reaches the hub, "
            "'tiny:<family>' or 'base:<family>'."
        ) from e
    family = family_of_config(config)
    kw = {"attn_implementation": attn_implementation} if attn_implementation else {}
    model = family.model_class.from_pretrained(path_or_id, dtype=dtype or torch.float32, **kw)
    processor = image_only(family.processor_class).from_pretrained(path_or_id)
    return Loaded(model, processor, family, path_or_id)


def load_model(ref: str, *, dtype: torch.dtype | None = None, attn_implementation: str | None = None) -> Loaded:
    """Resolve any model reference to a model + processor, with weights in `dtype` (default fp32)."""
    if ref.startswith("tiny:"):
        loaded = build_tiny(ref.split(":", 1)[1])
        if dtype is not None:
            loaded.model.to(dtype)
        return loaded
    if ref.startswith("base:"):
        from lmm_ray import base

        ref = str(base.ensure(ref))
    return load_pretrained(ref, dtype=dtype, attn_implementation=attn_implementation)


def model_config(ref: str, *, offline: bool = False, looked_in: list | None = None):
    """(family, config) of a reference without loading weights: what validation needs.

    `offline` reads only what is on this machine: a local folder, the tiny and base builders,
    or a configuration shipped in lmm_ray/hub_configs/ for the study's hub models. A hub id is read
    from the HF cache first, then from the hub after one short request says it is there
    (`hub_problem`); `looked_in` (the folders a local reading of `ref` would be) goes into the error.
    """
    from transformers import AutoConfig

    if ref.startswith("tiny:"):
        loaded = build_tiny(ref.split(":", 1)[1])
        return loaded.family, loaded.model.config
    if ref.startswith("base:"):
        from lmm_ray import base

        family, preset = base.parse_ref(ref)
        loaded = build_tiny(family, base.PRESETS[preset].size)
        return loaded.family, loaded.model.config
    ref = local_ref(ref)
    if os.path.isdir(ref):  # a local folder is never sent to the hub
        config = AutoConfig.from_pretrained(ref)
        return family_of_config(config), config
    shipped = HUB_CONFIGS / (ref.replace("/", "--") + ".json")
    if offline:
        if not shipped.is_file():
            known = sorted(p.stem.replace("--", "/") for p in HUB_CONFIGS.glob("*.json"))
            raise ValueError(f"no configuration of {ref!r} is available offline; shipped: {', '.join(known)} "
                             "(or use a local folder that holds its config.json)")
        config = AutoConfig.from_pretrained(str(shipped))
        return family_of_config(config), config
    try:
        config = AutoConfig.from_pretrained(ref, local_files_only=True)  # in the HF cache: no network
    except (OSError, ValueError):
        problem = hub_problem(ref)
        if problem is None:
            config = AutoConfig.from_pretrained(ref)
        elif shipped.is_file():
            config = AutoConfig.from_pretrained(str(shipped))  # no hub here: the shipped copy
        else:
            raise ModelNotFound(ref, problem, looked_in) from None
    return family_of_config(config), config


HUB_CONFIGS = Path(__file__).with_name("hub_configs")

# One request with this timeout decides whether the hub can give a model. transformers' own
# download retries a failed connection with back-off (~30 s offline) and then blames "your
# internet connection", even when the user meant a local folder that is not there.
HUB_TIMEOUT_S = 10.0
HUB_FIX = ("give a local folder written by save_pretrained (an absolute path, or ./relative to the sweep file), "
           "tiny:<family> or base:<family>; or check the hub id and the network (offline: HF_HUB_OFFLINE=1 with the "
           "model in the HF cache)")


class ModelNotFound(UserError, ValueError):
    """A model reference that is neither a local folder nor a model the hub gives now."""

    def __init__(self, ref: str, problem: str, looked_in: list | None = None):
        self.ref, self.problem = ref, problem
        folders = list(dict.fromkeys(str(p) for p in (looked_in or [Path.cwd() / ref])))
        self.reason = (f"{ref!r} is not a local folder (looked in {' and '.join(folders)}), and not a reachable "
                       f"hub id: {problem}")
        super().__init__(self.reason)

    def __str__(self) -> str:
        return f"{self.reason}\n  fix: {HUB_FIX}"


def local_ref(ref: str) -> str:
    """`~` expanded: `~/models/x` is a folder, never a hub id."""
    return os.path.expanduser(ref) if ref.startswith("~") else ref


def hub_offline() -> bool:
    import huggingface_hub.constants as hc

    env = (os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or "").strip().upper()
    return bool(hc.HF_HUB_OFFLINE) or env in ("1", "ON", "YES", "TRUE")


def hub_problem(repo_id: str, timeout: float = HUB_TIMEOUT_S) -> str | None:
    """Why the hub cannot give model `repo_id` now (None: it can). One request, no retries."""
    if hub_offline():
        return "HF_HUB_OFFLINE is set and the model is not in the HF cache"
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, HFValidationError, HfHubHTTPError, RepositoryNotFoundError

    try:
        HfApi().model_info(repo_id, timeout=timeout)
    except GatedRepoError:
        return None  # it exists; from_pretrained says how to get access
    except RepositoryNotFoundError:
        return f"the hub has no model {repo_id} (or it is private: log in with `hf auth login`)"
    except HFValidationError as e:
        return f"{repo_id!r} is not a valid hub id ({str(e).splitlines()[0]})"
    except HfHubHTTPError as e:
        status = getattr(getattr(e, "response", None), "status_code", "?")
        return f"the hub answered HTTP {status} for {repo_id}"
    except Exception as e:  # noqa: BLE001 - DNS, refused, timeout, proxy: all mean "not reachable from here"
        return f"the hub could not be reached ({e.__class__.__name__}: {str(e)[:120]})"
    return None


def ensure_reachable(ref: str, looked_in: list | None = None) -> None:
    """Raise ModelNotFound unless hub id `ref` is in the HF cache or the hub has it."""
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(ref, local_files_only=True)
        return
    except (OSError, ValueError):
        pass
    problem = hub_problem(ref)
    if problem is not None:
        raise ModelNotFound(ref, problem, looked_in)


def meta_model(family: Family, config):
    """The model's parameters (names and shapes) without allocating their memory."""
    with torch.device("meta"):
        return family.model_class(config)
