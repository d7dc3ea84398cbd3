"""Load a transformers MoE model and describe where its routing lives, from the family table."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import threads as _threads
from ..errors import WorkbenchError
from .families import (FAMILIES, GENERIC_BLOCK_NAMES, GENERIC_ROUTER_NAMES, SUPPORTED_SENTENCE, UNSUPPORTED, Family,
                       contract_problems, drift_sentence, missing_parts, modeling_module)
from .hooks import Hooks, RoutingTrace, decoder_layers, trace_routing

_threads.note_torch()  # torch's thread count before any load_model: a later change is the user's

DEMO_MODEL_DIR = Path(__file__).resolve().parent.parent / "assets" / "demo_model"

@contextlib.contextmanager
def seeded(seed: int):
    """torch.manual_seed(seed) for the block only: the caller's random state is restored afterwards, so
    a seeded generation in a notebook does not reset the user's own random stream. CPU always, CUDA
    devices when CUDA is initialised (forking them would otherwise start CUDA for a CPU model)."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


@dataclass
class MoELayer:
    """One MoE decoder layer: `index` is the decoder-layer index, never a position among MoE layers."""

    index: int
    block: torch.nn.Module
    router: torch.nn.Module
    experts: torch.nn.Module
    shared: torch.nn.Module | None = None
    shared_gate: torch.nn.Module | None = None


@dataclass
class MoEModel:
    """A loaded model plus the facts every probe, intervention and analysis needs."""

    model: torch.nn.Module
    tokenizer: object
    family: Family
    generic: bool
    spec: str
    path: str
    n_layers: int
    layers: list[MoELayer]
    n_experts: int
    top_k: int
    file_hashes: dict[str, str] = field(default_factory=dict)
    hub_kernels: str = "off"  # "off", or "on (no MoE block replaced)" for a kernelized model the user built
    layerwise: bool = False  # loaded by workbench.layerwise: capture runs one decoder layer at a time

    @property
    def moe_layers(self) -> list[int]:
        return [layer.index for layer in self.layers]

    def layer(self, index: int) -> MoELayer:
        for layer in self.layers:
            if layer.index == index:
                return layer
        raise KeyError(index)

    @property
    def device(self) -> torch.device:
        """Where inputs go: the first parameter's device, or, for a model split by a device_map
        (whose offloaded weights sit on `meta`), the device the input embeddings run on."""
        dm = getattr(self.model, "hf_device_map", None)
        if dm:
            emb = self.model.get_input_embeddings()
            hook = getattr(emb, "_hf_hook", None)
            dev = getattr(hook, "execution_device", None)
            if dev is None:
                dev = emb.weight.device
            dev = torch.device(dev if not isinstance(dev, int) else f"cuda:{dev}")
            return dev if dev.type != "meta" else torch.device("cpu")
        return next(self.model.parameters()).device

    @property
    def n_shared(self) -> int:
        return int(any(layer.shared is not None for layer in self.layers))

    def describe(self) -> dict:
        """The `model` section of a run manifest."""
        cfg = self.model.config
        return {
            "spec": self.spec,
            "path": self.path,
            "model_type": cfg.model_type,
            "family": "generic" if self.generic else self.family.model_type,
            "routing_rule": self.family.rule,
            "norm_topk_prob": bool(getattr(cfg, "norm_topk_prob", False)),
            "n_layers": self.n_layers,
            "moe_layers": self.moe_layers,
            "n_experts": self.n_experts,
            "top_k": self.top_k,
            "shared_experts": self.n_shared,
            "hidden_size": int(cfg.hidden_size),
            "vocab_size": int(cfg.vocab_size),
            "revision": getattr(cfg, "_commit_hash", None),
            "file_hashes": self.file_hashes,
            "hub_kernels": self.hub_kernels,
        }

    def steer(self, **interventions):
        """Context manager applying interventions (ban/force/boost/zero/scale) for its body."""
        from ..probes.interventions import steer

        return steer(self, **interventions)

    def tokenize(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def hooks(self, mapping: dict, prepend: bool = False) -> Hooks:
        """Hooks at named sites ({"L3.router": fn, "L12.residual": fn}; see models.hooks), registered now,
        all or nothing, and removed by `.remove()` or at the end of a `with` block."""
        return Hooks(self, mapping, prepend=prepend)

    def hook_sites(self) -> list[str]:
        """Every hook-site name of this model."""
        from .hooks import sites

        return sites(self)

    def trace_routing(self, texts, logits: bool = False, batch_size: int = 1, layers=None) -> RoutingTrace:
        """The routing of `texts` in memory, as capture would record it (see models.hooks.trace_routing)."""
        return trace_routing(self, texts, logits=logits, batch_size=batch_size, layers=layers)


def resolve_model_path(spec: str) -> str:
    """`demo` -> the bundled model; a folder -> itself; anything else is treated as a hub id."""
    if spec == "demo":
        # WORKBENCH_DEMO_MODEL points `demo` at a retrained model (or a tiny one in quick checks).
        demo = Path(os.environ.get("WORKBENCH_DEMO_MODEL") or DEMO_MODEL_DIR)
        if not (demo / "config.json").exists():
            raise WorkbenchError(f"the bundled demo model is missing from {demo}")
        return str(demo)
    p = Path(spec).expanduser()
    if p.exists():
        if not (p / "config.json").exists():
            raise WorkbenchError(f"{spec} is a folder without a config.json, not a transformers model")
        return str(p.resolve())
    if spec.startswith((".", "/", "~")) or os.sep in spec and spec.count("/") != 1:
        raise WorkbenchError(f"model path {spec} does not exist")
    return spec  # hub id


def _hash_files(path: str) -> dict[str, str]:
    p = Path(path)
    if not p.is_dir():
        return {}
    out = {}
    for f in sorted(p.iterdir()):
        if f.suffix in (".json", ".safetensors") and f.is_file():
            h = hashlib.sha256()
            with open(f, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
            out[f.name] = h.hexdigest()[:16]
    return out


_decoder_layers = decoder_layers  # the old private name, still imported by code outside the package


def _looks_like_experts(mod) -> bool:
    return mod is not None and hasattr(mod, "down_proj") and getattr(mod.down_proj, "ndim", 0) == 3


def find_moe_layers(model, family: Family | None) -> tuple[Family, bool, list[MoELayer]]:
    """Locate router/experts per decoder layer from the family row, or by structure (generic)."""
    generic = family is None
    layers = []
    for i, dec in enumerate(decoder_layers(model)):
        names = family.block if family else GENERIC_BLOCK_NAMES
        block = next((getattr(dec, n) for n in names if hasattr(dec, n)), None)
        if block is None:
            continue
        if family:
            router, experts = getattr(block, family.router, None), getattr(block, family.experts, None)
        else:
            router = next((getattr(block, n) for n in GENERIC_ROUTER_NAMES if hasattr(block, n)), None)
            experts = getattr(block, "experts", None)
        if router is None or not _looks_like_experts(experts):
            continue  # a dense layer
        shared = getattr(block, family.shared, None) if family and family.shared else None
        sgate = getattr(block, family.shared_gate, None) if family and family.shared_gate else None
        layers.append(MoELayer(i, block, router, experts, shared, sgate))
    if generic:
        rule = "generic"
        family = Family(model_type=model.config.model_type, rule=rule)
    return family, generic, layers


def _config_int(cfg, keys) -> int | None:
    for k in keys:
        v = getattr(cfg, k, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def check_device(device) -> None:
    """Refuse a device this machine does not have, in one sentence (torch asserts or raises deep inside)."""
    if device is None or device == "auto":
        return
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise WorkbenchError(f"--device {device!r} is not a device name; use cpu, cuda or cuda:N") from None
    if dev.type == "cpu":
        return
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise WorkbenchError(f"--device {device}: this machine has no usable CUDA GPU (or torch was built "
                                 "without CUDA); use --device cpu")
        if dev.index is not None and dev.index >= n:
            raise WorkbenchError(f"--device {device}: this machine has {n} CUDA GPU(s), cuda:0 to cuda:{n - 1}")
        return
    backend = getattr(torch.backends, dev.type, None) if dev.type != "meta" else None
    if dev.type == "meta" or backend is None or not getattr(backend, "is_available", lambda: False)():
        raise WorkbenchError(f"--device {device}: not available on this machine; use cpu or cuda")


def load_model(
    spec: str,
    device: str | None = None,
    dtype: str | torch.dtype | None = None,
    trust_remote_code: bool = False,
    experts_implementation: str | None = "auto",
    device_map: str | dict | None = None,
    max_memory: str | dict | None = None,
    offload_folder: str | None = None,
    threads: int | str | None = "auto",
) -> MoEModel:
    """Load `spec` (hub id, local folder or `demo`) in eval mode and map its MoE layers.

    experts_implementation "auto": `eager` on CPU (captured routing and outputs bit-comparable with
    the reference path, and the fastest there), the model's own default (grouped_mm) on a GPU, where
    eager is 2-4x slower. None keeps the model's default everywhere; any other name is passed on.

    device_map ("auto", "balanced", "sequential" or a dict) and max_memory ("0=70GiB,cpu=200GiB" or
    a dict) split a model too big for one device through accelerate: layers on several GPUs, the CPU,
    or disk (weights read back layer by layer, into `offload_folder`). `device` is then ignored.

    threads: torch's intra-op CPU threads. "auto" (decided once per process, see workbench.threads):
    the cores free for this process, never more than torch has now, unless OMP_NUM_THREADS /
    MKL_NUM_THREADS chose; an int or WORKBENCH_THREADS sets it; None leaves torch alone.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    check_device(device)
    if threads is not None:
        _threads.ensure(None if threads == "auto" else threads)
    path = resolve_model_path(spec)
    local_only = _hub_offline(spec, path)
    try:
        cfg = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code, local_files_only=local_only)
    except OSError as e:
        raise WorkbenchError(f"cannot load model {spec!r}: {str(e).splitlines()[0]}") from None
    except ValueError as e:
        raise WorkbenchError(f"cannot load model {spec!r}: {str(e).splitlines()[0]}") from None
    mt = cfg.model_type
    if mt in UNSUPPORTED:
        raise WorkbenchError(f"{mt} is not supported ({UNSUPPORTED[mt]}); {SUPPORTED_SENTENCE}")
    torch_dtype = _parse_dtype(dtype)
    if torch_dtype is None and spec == "demo" and (device is None or str(device) == "cpu"):
        torch_dtype = torch.float32  # the demo ships bf16 weights; bf16 matmuls on CPU are slow and coarse
    # Hub kernels off: from transformers 5.25 they are on by default and may swap a layer's forward for
    # code the probes do not see; the workbench measures the model's own MoE code.
    kwargs = {"trust_remote_code": trust_remote_code, "local_files_only": local_only, "use_kernels": False}
    if torch_dtype is not None:
        kwargs["dtype"] = torch_dtype
    if max_memory is not None and device_map is None:
        device_map = "auto"
    if device_map is not None:
        kwargs.update(_device_map_kwargs(device_map, max_memory, offload_folder))
        device = None
    if experts_implementation == "auto":
        on_gpu = (device is not None and torch.device(device).type != "cpu") or \
            (device_map is not None and torch.cuda.is_available())
        experts_implementation = None if on_gpu else "eager"
    if experts_implementation:
        kwargs["experts_implementation"] = experts_implementation
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as e:
        raise WorkbenchError(f"cannot load model {spec!r}: {str(e).splitlines()[0]}") from None
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, local_files_only=local_only)
    if device:
        model.to(device)
    return wrap_model(model, tok, spec=spec, path=path)


def parse_max_memory(spec: str | dict | None) -> dict | None:
    """'0=70GiB,1=70GiB,cpu=200GiB' -> {0: '70GiB', 1: '70GiB', 'cpu': '200GiB'} (accelerate's form)."""
    if spec is None or isinstance(spec, dict):
        return spec
    out: dict = {}
    for item in [s.strip() for s in str(spec).split(",") if s.strip()]:
        key, sep, val = item.partition("=")
        key, val = key.strip(), val.strip()
        if not sep or not val or not (key.isdigit() or key in ("cpu", "disk", "mps")):
            raise WorkbenchError(f"malformed --max-memory item {item!r}: write DEVICE=SIZE, e.g. 0=70GiB,cpu=200GiB")
        if not any(ch.isdigit() for ch in val):
            raise WorkbenchError(f"--max-memory {item!r}: {val!r} is not a size such as 70GiB or 500MB")
        out[int(key) if key.isdigit() else key] = val
    if not out:
        raise WorkbenchError("--max-memory is empty: write DEVICE=SIZE, e.g. 0=70GiB,cpu=200GiB")
    return out


def _device_map_kwargs(device_map, max_memory, offload_folder) -> dict:
    try:
        import accelerate  # noqa: F401
    except ImportError:
        raise WorkbenchError("--device-map needs accelerate: pip install 'moe-workbench[scale]'") from None
    if isinstance(device_map, str) and device_map not in ("auto", "balanced", "balanced_low_0", "sequential"):
        raise WorkbenchError(f"unknown --device-map {device_map!r}; use auto, balanced, balanced_low_0 or sequential")
    kw = {"device_map": device_map}
    mem = parse_max_memory(max_memory)
    if mem is not None:
        kw["max_memory"] = mem
    if offload_folder is None:
        import tempfile

        offload_folder = tempfile.mkdtemp(prefix="wb_offload_")
    kw["offload_folder"] = str(offload_folder)
    return kw


def _hub_offline(spec: str, path: str) -> bool:
    """For a hub id: True when the hub is unreachable (or HF_HUB_OFFLINE is set) and the model is in
    the local cache, so transformers reads the cache without five retries; a WorkbenchError at once
    when it is unreachable and not cached. False (normal download) when the hub answers."""
    if Path(path).is_dir():
        return False
    from huggingface_hub import constants, try_to_load_from_cache

    cached = isinstance(try_to_load_from_cache(spec, "config.json"), str)
    offline = bool(constants.HF_HUB_OFFLINE)
    if not offline:
        import socket
        from urllib.parse import urlparse

        url = urlparse(constants.ENDPOINT)
        try:
            socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)),
                                     timeout=3).close()
        except OSError:
            offline = True
    if offline and not cached:
        raise WorkbenchError(f"cannot load model {spec!r}: it is not in the local Hugging Face cache and "
                             f"{constants.ENDPOINT} cannot be reached (offline?); give a local folder or 'demo'")
    return offline


def moe_replacements(family: Family, generic: bool, layers: list[MoELayer], foreign_classes: bool = True) -> list[str]:
    """Each MoE part (block, router, experts) whose forward is not the family's own transformers code,
    as "layer 3 router (why)". Kernels (the `kernels` package) swap `forward` on the instance and leave
    `_kernel_repo`; a class-level patch shows as a forward defined outside transformers. With
    `foreign_classes`, a part whose class is not from the family's modeling module counts too (hub
    kernel replacements swap whole modules); without, that is left to the family contract check."""
    expected = None if generic or not foreign_classes else modeling_module(family)
    out = []
    for layer in layers:
        for part, mod in (("MoE block", layer.block), ("router", layer.router), ("experts", layer.experts)):
            why = _replaced_how(mod, expected)
            if why:
                out.append(f"layer {layer.index} {part} {type(mod).__name__} ({why})")
    return out


def _qualname(fn) -> str:
    fn = getattr(fn, "__func__", fn)
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', type(fn).__name__)}"


def _replaced_how(mod: torch.nn.Module, expected_module: str | None) -> str | None:
    cls = type(mod)
    repo = mod.__dict__.get("_kernel_repo")
    if repo is not None:
        return f"forward replaced by the hub kernel {repo}"
    fwd = mod.__dict__.get("forward")
    if fwd is not None and hasattr(mod, "_hf_hook"):  # accelerate's device hook wraps the original forward
        fwd = mod.__dict__.get("_old_forward")
    if fwd is not None and getattr(fwd, "__func__", None) is not cls.forward:
        return f"forward replaced on the instance by {_qualname(fwd)}"
    if expected_module is not None and cls.__module__ != expected_module:
        return f"class from {cls.__module__}, not {expected_module}"
    owner = next(k for k in cls.__mro__ if "forward" in k.__dict__)
    fn = owner.__dict__["forward"]
    where = getattr(fn, "__module__", None) or ""
    if where != owner.__module__ and not where.startswith("transformers."):  # a third party patched the class
        return f"{owner.__name__}.forward replaced by {_qualname(fn)}"
    return None


def wrap_model(model, tokenizer, spec: str = "<in-memory>", path: str = "") -> MoEModel:
    """Wrap an already-loaded transformers model (e.g. built in a notebook) for the workbench."""
    model.eval()  # from_config builds in training mode; PhiMoE routes randomly while training
    cfg = model.config
    family = FAMILIES.get(cfg.model_type)
    family, generic, layers = find_moe_layers(model, family)
    kernels_on = bool(getattr(model, "use_kernels", False))
    # trust_remote_code: the model's classes live outside transformers (transformers_modules.*)
    remote = None if type(model).__module__.startswith("transformers.") else type(model).__module__
    replaced = moe_replacements(family, generic or remote is not None, layers, foreign_classes=kernels_on)
    if replaced:
        how = "hub kernels (use_kernels=True) replaced" if kernels_on else "something replaced"
        more = f" and {len(replaced) - 1} more" if len(replaced) > 1 else ""
        fix = "reload with use_kernels=False" if kernels_on else "load the model without that patch"
        raise WorkbenchError(f"{spec} ({cfg.model_type}): {how} MoE code the probes must see: {replaced[0]}{more}; {fix}")
    if not layers:
        drift = None if generic else missing_parts(family, decoder_layers(model))
        if drift:
            raise WorkbenchError(drift_sentence(family.model_type, drift, remote=remote))
        what = "a dense model" if family and not generic or not layers else "an unsupported MoE"
        raise WorkbenchError(f"{spec} ({cfg.model_type}) has no MoE layers the workbench can probe: {what}; {SUPPORTED_SENTENCE}")
    n_exp = _config_int(cfg, family.n_experts_keys) or int(layers[0].experts.down_proj.shape[0])
    top_k = _config_int(cfg, family.top_k_keys) or getattr(layers[0].router, "top_k", None)
    if not top_k:
        raise WorkbenchError(f"cannot tell how many experts a token uses in {cfg.model_type}; {SUPPORTED_SENTENCE}")
    if not generic:  # upstream drift: a loud sentence here, never a wrong capture later
        problems = contract_problems(family, layers, int(n_exp), int(top_k), int(cfg.hidden_size),
                                     check_classes=remote is None)
        if problems:
            raise WorkbenchError(drift_sentence(family.model_type, problems[0], len(problems) - 1, remote=remote))
    if tokenizer is not None and tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.convert_ids_to_tokens(0)
    n_layers = len(decoder_layers(model))
    return MoEModel(
        model=model,
        tokenizer=tokenizer,
        family=family,
        generic=generic,
        spec=spec,
        path=path,
        n_layers=n_layers,
        layers=layers,
        n_experts=int(n_exp),
        top_k=int(top_k),
        file_hashes=_hash_files(path) if path else {},
        hub_kernels="on (no MoE block replaced)" if kernels_on else "off",
    )


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "auto": "auto"}


def _parse_dtype(dtype):
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise WorkbenchError(f"unknown dtype {dtype!r}; use one of {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def config_json(path: str) -> dict:
    with open(Path(path) / "config.json") as f:
        return json.load(f)
