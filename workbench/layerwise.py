"""`--layerwise`: models bigger than the machine, one decoder layer at a time.

The usual forward runs every layer for one batch. Here a chunk of batches (`chunk_tokens` tokens)
goes through layer 0, then layer 1, ...: each layer's weights are read once from disk, used for every
batch of the chunk and freed, while the residual stream of all sequences waits in host memory.
Peak accelerator memory is one layer plus one batch's activations (plus the embeddings).

Loading uses transformers + accelerate themselves (`device_map` with every decoder layer on "disk"):
transformers converts checkpoint formats (e.g. per-expert Mixtral weights -> fused experts) and
accelerate reads each offloaded tensor back from the safetensors shards (or, for converted tensors,
from `offload_folder`). We only decide *when*: a layer is made resident for a whole chunk instead of
per call. What each layer receives (masks per layer type, rotary embeddings, position ids) is what the
model's own forward computes: one pass with the layers replaced by recorders gives it, per batch.

Probes and interventions are the ordinary hooks; their per-batch state is parked on the host between
layers and restored, so every table equals the normal path's.
"""

from __future__ import annotations

import contextlib

import torch

from .errors import WorkbenchError
from .pipeline import batch_context

# Attributes of a probe holding what it recorded for the batch in flight (probes/*.py `begin`).
_STATE = ("ctx", "fired", "_seen", "_margin", "_shared", "_dumps")


def load_layerwise(spec: str, device: str | None = None, dtype=None, offload_folder: str | None = None,
                   trust_remote_code: bool = False):
    """Load `spec` with the embeddings/norm on `device` and every decoder layer (and lm_head) on disk."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from .models.loading import load_model, resolve_model_path

    try:
        from accelerate import init_empty_weights
    except ImportError:
        raise WorkbenchError("--layerwise needs accelerate: pip install 'moe-workbench[scale]'") from None
    path = resolve_model_path(spec)
    try:
        cfg = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise WorkbenchError(f"cannot load model {spec!r}: {str(e).splitlines()[0]}") from None
    dev = str(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev == "cuda":
        dev = "cuda:0"
    with init_empty_weights():
        skel = AutoModelForCausalLM.from_config(cfg, trust_remote_code=trust_remote_code)
    dm = _device_map(skel, dev)
    mm = load_model(spec, dtype=dtype, trust_remote_code=trust_remote_code, device_map=dm,
                    offload_folder=offload_folder,
                    experts_implementation=None if dev.startswith("cuda") else "eager")
    mm.layerwise = True
    return mm


def _device_map(skel, dev: str) -> dict:
    from .models.hooks import decoder_layers

    layers = decoder_layers(skel)
    names = {id(m): n for n, m in skel.named_modules()}
    prefix = names[id(layers)]
    dm = {f"{prefix}.{i}": "disk" for i in range(len(layers))}
    base_name = prefix.rsplit(".", 1)[0] if "." in prefix else ""
    base = skel.get_submodule(base_name) if base_name else skel
    for n, _ in base.named_children():
        full = f"{base_name}.{n}" if base_name else n
        if full != prefix:
            dm[full] = dev
    tied = bool(getattr(skel.config, "tie_word_embeddings", False))
    for n, _ in skel.named_children():
        if n != (base_name.split(".")[0] if base_name else None) and n not in dm:
            dm[n] = dev if tied else "disk"  # lm_head is never run: capture stops at the last layer
    return dm


@contextlib.contextmanager
def resident(module: torch.nn.Module):
    """Load every disk-offloaded tensor of `module` once, keep it for the block, then free it."""
    from accelerate.hooks import AlignDevicesHook

    held = []
    for m in module.modules():
        h = getattr(m, "_hf_hook", None)
        for hk in getattr(h, "hooks", None) or ([h] if h is not None else []):
            if isinstance(hk, AlignDevicesHook) and hk.offload:
                hk.pre_forward(m)
                hk.offload = False
                held.append((m, hk))
    try:
        yield
    finally:
        for m, hk in held:
            hk.offload = True
            hk.post_forward(m, None)


class _Recorder(torch.nn.Module):
    """Stands in for decoder layer `index` during the model's own forward: keeps its arguments."""

    def __init__(self, index: int, calls: dict):
        super().__init__()
        self.index, self.calls = index, calls

    def forward(self, hidden_states, *args, **kwargs):
        self.calls[self.index] = (args, kwargs)
        if self.index == 0:
            self.calls["h"] = hidden_states
        return hidden_states


def _map(obj, fn):
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, tuple):
        return tuple(_map(o, fn) for o in obj)
    if isinstance(obj, list):
        return [_map(o, fn) for o in obj]
    if isinstance(obj, dict):
        return {k: _map(v, fn) for k, v in obj.items()}
    return obj


def _to(device, cache: dict | None = None):
    def fn(t):
        if t.device == torch.device(device):
            return t
        if cache is None:
            return t.to(device, non_blocking=True)
        key = id(t)  # layers of one type share their mask / rotary tensors: copy each once
        if key not in cache:
            cache[key] = t.to(device, non_blocking=True)
        return cache[key]
    return fn


def _park(probes) -> list[dict]:
    """Take each probe's per-batch state, moved to host memory."""
    out = []
    for p in probes:
        st = {a: getattr(p, a) for a in _STATE if hasattr(p, a)}
        out.append({a: (v if a == "ctx" else _map(v, _to("cpu"))) for a, v in st.items()})
    return out


def _unpark(probes, states) -> None:
    for p, st in zip(probes, states):
        for a, v in st.items():
            setattr(p, a, v)
        if hasattr(p, "_vmap"):
            p._vmap = None  # a device-side index, rebuilt on demand


def _chunks(indices, batches, chunk_tokens: int):
    cur, n = [], 0
    for bi in indices:
        cur.append(bi)
        n += sum(len(s.ids) for s in batches[bi])
        if n >= chunk_tokens:
            yield cur
            cur, n = [], 0
    if cur:
        yield cur


class LayerMajor:
    """Capture schedule of a `--layerwise` model: one process, chunks of batches layer by layer, into the
    run store; resumes after the last listed part, as the sequential schedule does."""

    materialize = True

    def __init__(self, mm):
        self.mm = mm
        self.store = None

    def describe(self, path) -> str:
        from pathlib import Path

        return f"capture {Path(path).name}"

    def open(self, out, manifest: dict, resume: bool, overwrite: bool):
        from .store import RunWriter

        self.store = RunWriter(out, manifest, resume=resume, overwrite=overwrite)
        return None if self.store.already_complete else self.store

    def plan(self, batches: list) -> tuple[tuple, int]:
        start = self.store.next_batch
        return (batches, range(start, len(batches))), sum(len(s.ids) for b in batches[start:] for s in b)

    def run(self, pipe, todo, pad, bar) -> None:
        batches, indices = todo
        forward_layerwise(self.mm, pipe, batches, indices, pad, bar)

    def finish(self, writer) -> None:
        self.store.finish(writer_wait_s=round(writer.blocked_s, 3))


def forward_layerwise(mm, pipe, batches, indices, pad, bar, chunk_tokens: int = 1 << 18) -> None:
    """Capture `batches[indices]` layer-major; hands each batch to `pipe.end` in order, as capture does."""
    from .models.hooks import decoder_layers

    layers = decoder_layers(mm.model)
    owner, attr = _layers_owner(mm.model, layers)
    dev = mm.device
    probes = pipe.probes
    indices = list(indices)
    last = indices[-1] if indices else None
    for chunk in _chunks(indices, batches, chunk_tokens):
        items = []
        calls: dict = {}
        setattr(owner, attr, torch.nn.ModuleList([_Recorder(i, calls) for i in range(len(layers))]))
        try:
            for bi in chunk:  # embeddings, masks and rotary tables, computed by the model's own code
                ctx, token_ids, src, lengths = batch_context(batches[bi], pad, dev)
                calls.clear()
                mm.model.get_decoder()(input_ids=ctx.input_ids, attention_mask=ctx.attention_mask, use_cache=False)
                cache: dict = {}
                per_layer = [_map(calls[i], _to("cpu", cache)) for i in range(len(layers))]
                items.append({"bi": bi, "ctx": ctx, "tok": token_ids, "src": src, "len": lengths,
                              "h": calls["h"].to("cpu"), "calls": per_layer, "state": None})
        finally:
            setattr(owner, attr, layers)
            calls.clear()
        for li, layer in enumerate(layers):
            with resident(layer):
                for it in items:
                    if it["state"] is None:
                        pipe.begin(it["ctx"])
                    else:
                        _unpark(probes, it["state"])
                    args, kw = _map(it["calls"][li], _to(dev))
                    out = layer(it["h"].to(dev, non_blocking=True), *args, **kw)
                    out = out[0] if isinstance(out, (tuple, list)) else out
                    it["h"] = out.to("cpu")
                    it["state"] = _park(probes)
        for it in items:
            _unpark(probes, it["state"])
            pipe.end(it["ctx"], it["tok"], it["src"], it["bi"] + 1, it["len"], final=it["bi"] == last)
            bar.update(len(it["tok"]))


def _layers_owner(model, layers):
    for m in model.modules():
        for n, child in m.named_children():
            if child is layers:
                return m, n
    raise WorkbenchError("cannot find the module holding the decoder layers")
