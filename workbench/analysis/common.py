"""Shared readers: routing as dense numpy arrays, the layout every fast analysis wants."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl

from ..errors import WorkbenchError


@dataclass
class RoutingArrays:
    """Routing of a run, token-major: one row per (doc, pos), one column block per MoE layer.

    experts[t, l, k] is the k-th expert (model's order) token t chose in MoE layer layers[l].
    """

    doc: np.ndarray  # [T] int64
    pos: np.ndarray  # [T] int32
    layers: list[int]
    experts: np.ndarray  # [T, L, K] int16
    weights: np.ndarray  # [T, L, K] float32
    n_experts: int

    @property
    def doc_bounds(self) -> np.ndarray:
        """Start offsets of each document's rows, plus the end (rows are sorted by doc, pos)."""
        change = np.flatnonzero(np.diff(self.doc)) + 1
        return np.concatenate([[0], change, [len(self.doc)]])


def routing_arrays(run, phase: str | None = None, docs=None) -> RoutingArrays:
    """Load `routing/` into dense arrays sorted by (doc_id, pos); optional phase / doc filter."""
    lf = run.routing
    if phase is not None:
        keep = run.tokens.filter(pl.col("phase") == phase).select("doc_id", "pos")
        lf = lf.join(keep, on=["doc_id", "pos"], how="semi")
    if docs is not None:
        lf = lf.filter(pl.col("doc_id").is_in(list(docs)))
    df = lf.select("doc_id", "pos", "layer", "experts", "weights").sort("doc_id", "pos", "layer").collect()
    layers = sorted(run.moe_layers)
    nl = len(layers)
    if df.height == 0:
        raise WorkbenchError(f"run {run.path} has no routing rows")
    if df.height % nl:
        raise WorkbenchError(f"run {run.path}: routing rows are not a whole number of tokens x {nl} layers")
    t = df.height // nl
    k = run.top_k
    ex = df["experts"].list.to_array(k).to_numpy().reshape(t, nl, k).astype(np.int16)
    w = df["weights"].list.to_array(k).to_numpy().reshape(t, nl, k).astype(np.float32)
    doc = df["doc_id"].to_numpy()[::nl]
    pos = df["pos"].to_numpy()[::nl]
    return RoutingArrays(doc=doc, pos=pos, layers=layers, experts=ex, weights=w, n_experts=run.n_experts)


def doc_labels(run, columns, phase: str | None = None) -> pl.DataFrame:
    """One row per document: doc_id, n_tokens, and each label column's value on the doc's first token.

    Labels come per record, so every token of a document carries the same value; packed runs
    (`--seq-len`) can mix records in one sequence, and then the first token decides.
    """
    columns = [columns] if isinstance(columns, str) else list(columns)
    lf = run.tokens
    have = lf.collect_schema().names()
    missing = [c for c in columns if c not in have]
    if missing:
        labels = ", ".join(c for c in have if c not in ("doc_id", "pos", "token_id", "token", "phase")) or "none"
        raise WorkbenchError(f"run {run.path} has no label column {missing[0]!r} (labels: {labels})")
    if phase is not None:
        lf = lf.filter(pl.col("phase") == phase)
    return (lf.sort("doc_id", "pos").group_by("doc_id", maintain_order=True)
            .agg(pl.len().alias("n_tokens"), *[pl.col(c).first() for c in columns]).collect())


def doc_token_ids(run, docs=None, phase: str | None = "prefill") -> dict[int, np.ndarray]:
    """doc_id -> the document's token ids in position order (what a loop re-feeds to a model)."""
    lf = run.tokens
    if phase is not None:
        lf = lf.filter(pl.col("phase") == phase)
    if docs is not None:
        lf = lf.filter(pl.col("doc_id").is_in([int(d) for d in docs]))
    df = lf.select("doc_id", "pos", "token_id").sort("doc_id", "pos").collect()
    out = {}
    for d, ids in df.group_by("doc_id", maintain_order=True).agg(pl.col("token_id")).iter_rows():
        out[int(d)] = np.asarray(ids, np.int64)
    return out
