"""What replay and stability share: model identity checks, batches of whole sequences, set comparisons,
the two forwards (free and replayed) and writing a result folder."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import WorkbenchError
from ..pipeline import pad_batch


@dataclass
class Seq:
    """One sequence to forward: its id in the run (or dataset) and its token ids."""

    doc_id: int
    ids: np.ndarray  # int64


@dataclass
class Batch:
    """A right-padded batch and where its valid tokens sit in the flattened [B*S] forward."""

    seqs: list[Seq]
    input_ids: np.ndarray  # [B, S] int64
    mask: np.ndarray  # [B, S] int64
    rows: np.ndarray  # [Tv] int64: flat index of each valid token, sequence by sequence
    doc: np.ndarray  # [Tv] int64
    pos: np.ndarray  # [Tv] int32

    @property
    def width(self) -> int:
        return int(self.input_ids.shape[1])


def make_batches(seqs: list[Seq], batch_size: int, pad_id: int) -> list[Batch]:
    """Consecutive sequences, `batch_size` at a time, right-padded (what capture does)."""
    out = []
    for start in range(0, len(seqs), batch_size):
        chunk = seqs[start:start + batch_size]
        ids, mask, _, doc, pos = pad_batch(chunk, pad_id)
        rows = np.flatnonzero(mask.reshape(-1)).astype(np.int64)
        out.append(Batch(chunk, ids, mask, rows, doc, pos))
    return out


def sorted_sets(idx: np.ndarray) -> np.ndarray:
    """Expert sets in a comparable form: each row's ids sorted ([..., K])."""
    return np.sort(idx.astype(np.int16, copy=False), axis=-1)


def same_set(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """[..., K] x [..., K] -> [...] bool: the two rows select the same experts (order ignored)."""
    return (sorted_sets(a) == sorted_sets(b)).all(-1)


def overlap(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """[..., K] x [..., K] -> [...] share of a's experts that b also selects (|A & B| / K)."""
    return (a[..., :, None] == b[..., None, :]).any(-1).sum(-1) / a.shape[-1]


def model_identity_problem(mm, info: dict, what: str) -> str | None:
    """One sentence when the run's `model` section (`info`) does not describe `mm`: another model type,
    other decoder / MoE layers, experts or top-k, or (both known) other weight files, which is also
    what a copy with permuted experts is. None when they match."""
    mine = mm.describe()
    mt, their_mt = mine["model_type"], info.get("model_type")
    if their_mt not in (None, "unknown") and their_mt != mt:
        return f"{what} was recorded on a {their_mt} model, not on this {mt}; replay needs the model the routes came from"
    for key, name in (("n_layers", "decoder layers"), ("n_experts", "experts per layer"), ("top_k", "experts a token")):
        v = info.get(key)
        if v is not None and int(v) != int(mine[key]):
            return (f"{what} was recorded on a model with {v} {name}, this one has {mine[key]}: it is another model")
    theirs = list(info.get("model_moe_layers") or info.get("moe_layers") or [])
    if theirs and not set(theirs) <= set(mine["moe_layers"]):
        extra = sorted(set(theirs) - set(mine["moe_layers"]))
        return f"{what} routes layer {extra[0]} as an MoE layer, which is dense in this model: it is another model"
    fa, fb = info.get("file_hashes") or {}, mine.get("file_hashes") or {}
    common = sorted(set(fa) & set(fb) - {"config.json", "generation_config.json", "tokenizer.json",
                                          "tokenizer_config.json", "special_tokens_map.json"})
    if common and any(fa[k] != fb[k] for k in common):
        bad = next(k for k in common if fa[k] != fb[k])
        return (f"{what} was recorded on other weights ({bad} differs: another checkpoint, or the same model with its "
                f"experts permuted); replay needs the weights the routes came from (match experts first with "
                f"`workbench compare --match weights`)")
    return None


def check_ids(idx: np.ndarray, n_experts: int, what: str) -> None:
    if idx.size and (idx.min() < 0 or idx.max() >= n_experts):
        bad = int(idx.max()) if idx.max() >= n_experts else int(idx.min())
        raise WorkbenchError(f"{what} holds expert id {bad}, outside this model's 0-{n_experts - 1}: it was recorded "
                             "on another model (or with physical ids; import it with --physical-to-logical)")


def write_result(out, name: str, tables: dict, summary: dict, overwrite: bool) -> Path:
    """Write `tables` (polars frames) as `<table>.parquet` and the summary as `<name>.json` into `out`.

    Each file goes to a temporary name first, then is renamed (a killed write leaves the old file or none);
    the summary is written last, so a folder with `<name>.json` is complete. Other files stay untouched.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise WorkbenchError(f"--out {out} is a file, not a folder")
    if (out / f"{name}.json").exists() and not overwrite:
        raise WorkbenchError(f"--out {out} already holds a {name} result; pass --overwrite to replace it")
    try:
        out.mkdir(parents=True, exist_ok=True)
        for tname, df in tables.items():
            tmp = out / f".{tname}.parquet.tmp"
            df.write_parquet(tmp, compression="zstd")
            os.replace(tmp, out / f"{tname}.parquet")
        tmp = out / f".{name}.json.tmp"
        tmp.write_text(json.dumps(summary, indent=2, default=_json_default) + "\n")
        os.replace(tmp, out / f"{name}.json")
    except OSError as e:
        from ..store import io_error

        raise io_error(e, out) from None
    return out


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, Path):
        return str(o)
    raise TypeError(type(o).__name__)


def versions() -> dict:
    import platform

    import torch
    import transformers

    from .. import __version__

    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "workbench": __version__}


@dataclass
class Forwarded:
    """One forward's view of the batch's valid tokens: the routers' own choices (and margins) per layer,
    and the final logits when kept."""

    own: dict = field(default_factory=dict)  # layer -> [Tv, K] int64 numpy
    margin: dict = field(default_factory=dict)  # layer -> [Tv] float32 numpy
    logits: object = None  # torch [Tv, V] on the model's device


def forward(mm, fr, batch: Batch, routes: dict | None, keep_logits: bool = False) -> Forwarded:
    """Run one batch with `fr` (a probes.interventions.ForcedRoutes) replaying `routes` (None: free)."""
    import torch

    dev = mm.device
    ids = torch.from_numpy(batch.input_ids).to(dev)
    mask = torch.from_numpy(batch.mask).to(dev)
    rows = torch.from_numpy(batch.rows).to(dev)
    fr.set(routes)
    out = mm.model(input_ids=ids, attention_mask=mask, use_cache=False)
    missing = [i for i in fr.layers if i not in fr.own]
    if missing:
        raise WorkbenchError(f"the routers of layers {missing} did not run; the MoE block was replaced or bypassed")
    res = Forwarded()
    for layer in fr.layers:
        res.own[layer] = fr.own[layer].index_select(0, rows.to(fr.own[layer].device)).cpu().numpy()
        if layer in fr.margin:
            res.margin[layer] = fr.margin[layer].index_select(0, rows.to(fr.margin[layer].device)).float().cpu().numpy()
    if keep_logits:
        lg = out.logits
        res.logits = lg.reshape(-1, lg.shape[-1]).index_select(0, rows.to(lg.device))
    fr.set(None)
    return res
