"""The run contract, typed: `Manifest`, `Part` and `CaptureSettings` over a run folder's `manifest.json`.

The JSON on disk is the contract (schema version 1, unchanged): `from_json` reads any manifest the
workbench ever wrote, `to_json` gives back the same object, key for key and in the same order, so
`json.dumps(Manifest.from_json(m).to_json())` equals `json.dumps(m)`; keys this version does not name are
kept in `extra`. `problems()` says why a manifest cannot be trusted (the store refuses such a run).

    from workbench.manifest import Manifest
    m = Manifest.from_json(json.load(open("runs/cal/manifest.json")))
    m.n_tokens, m.parts[0].files["routing"], m.settings.batch_size

Imports nothing heavy: the CLI, the store and the importers share it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import PurePath
from typing import Any

SCHEMA_VERSION = 1
class _Absent:
    def __repr__(self) -> str:
        return "<absent>"


_MISSING: Any = _Absent()  # a field absent from the JSON (written back absent, not as null)


def _known(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if f.name not in ("extra", "order")]


def _from(cls, d: dict):
    """Build `cls` from a JSON object: named keys to fields (absent ones stay _MISSING), the rest to extra."""
    names = _known(cls)
    obj = cls(**{n: d.get(n, _MISSING) for n in names}, extra={k: v for k, v in d.items() if k not in names})
    obj.order = list(d)
    return obj


def _to(obj) -> dict:
    """The JSON object: keys in the order they were read, new ones after, absent ones left out."""
    vals = {n: getattr(obj, n) for n in _known(type(obj))}
    vals.update(obj.extra)
    order = [k for k in obj.order if k in vals] + [k for k in vals if k not in obj.order]
    out = {}
    for k in order:
        v = vals[k]
        if v is _MISSING:
            continue
        out[k] = v.to_json() if hasattr(v, "to_json") else [p.to_json() for p in v] if k == "parts" else v
    return out


def _present(v) -> bool:
    return v is not _MISSING and v is not None


@dataclass
class Part:
    """One committed part: consecutive batches, one Parquet file per table.

    files: table -> path relative to the run; bytes / checksums: table -> size and "xxh3_128:..." of
    each file (absent in runs written before checksums existed, and for a part listed without them)."""

    index: int = _MISSING
    batch_end: int = _MISSING  # batches done once this part is in (resume starts there)
    tokens: int = _MISSING  # real (non-padding) tokens in the part
    files: dict = _MISSING
    bytes: dict = _MISSING
    checksums: dict = _MISSING
    extra: dict = field(default_factory=dict)
    order: list = field(default_factory=list, repr=False, compare=False)

    @classmethod
    def from_json(cls, d: dict) -> Part:
        return _from(cls, d)

    def to_json(self) -> dict:
        return _to(self)

    def problems(self, i: int = 0) -> list[str]:
        files = self.files
        if not (isinstance(files, dict) and all(isinstance(v, str) for v in files.values())
                and type(self.tokens) is int and type(self.batch_end) is int):
            return [f"part {i} is malformed"]
        bad = [v for v in files.values() if PurePath(v).is_absolute() or ".." in PurePath(v).parts]
        return [f"part {i} points outside the run ({bad[0]})"] if bad else []


@dataclass
class CaptureSettings:
    """How a capture ran (the manifest's `settings`, also part of its identity for --resume)."""

    probes: dict = _MISSING  # probe table -> its settings
    batch_size: int = _MISSING
    seq_len: int | None = _MISSING  # packed sequences of this length; None: one per record
    max_tokens: int | None = _MISSING
    max_len: int = _MISSING  # the longest sequence the model takes
    layers: list = _MISSING  # MoE layers recorded; absent: all of them
    extra: dict = field(default_factory=dict)
    order: list = field(default_factory=list, repr=False, compare=False)

    @classmethod
    def from_json(cls, d: dict) -> CaptureSettings:
        return _from(cls, d)

    def to_json(self) -> dict:
        return _to(self)

    def problems(self) -> list[str]:
        out = []
        if _present(self.batch_size) and not (type(self.batch_size) is int and self.batch_size >= 1):
            out.append(f"settings.batch_size {self.batch_size!r} is not a positive integer")
        if _present(self.seq_len) and not (type(self.seq_len) is int and self.seq_len >= 1):
            out.append(f"settings.seq_len {self.seq_len!r} is not a positive integer")
        return out


@dataclass
class Manifest:
    """A run's manifest.json. `model` (spec, model_type, moe_layers, n_experts, top_k, ...), `dataset`,
    `identity` and `versions` stay plain objects: their keys grow with the model families and engines."""

    identity: dict = _MISSING  # what must match for --resume (model, data hash, settings, interventions)
    model: dict = _MISSING
    dataset: dict = _MISSING
    label_columns: list = _MISSING
    probes: dict = _MISSING
    settings: CaptureSettings = _MISSING
    interventions: dict = _MISSING
    dtype: str = _MISSING
    device: str = _MISSING
    versions: dict = _MISSING
    schema_version: int = _MISSING
    status: str = _MISSING  # "running" until the capture finishes, then "complete"
    parts: list = _MISSING  # list[Part]
    created: str = _MISSING
    finished: str = _MISSING
    repairs: list = _MISSING  # what `workbench check --repair` dropped
    extra: dict = field(default_factory=dict)
    order: list = field(default_factory=list, repr=False, compare=False)

    @classmethod
    def new(cls, *, identity: dict, model: dict, dataset: dict, label_columns: list, probes: dict, settings: dict,
            interventions: dict, dtype: str | None, device: str | None, versions: dict,
            source: str | None = None) -> Manifest:
        """The manifest a new run starts with, for every writer (capture, generation capture, engine import):
        one builder, so every manifest.json has the same keys in the same order. The store adds
        schema_version, status, parts and the times."""
        d: dict[str, Any] = {"identity": identity}
        if source is not None:
            d["source"] = source  # an engine import: which engine recorded the routing
        d.update(model=model, dataset=dataset, label_columns=label_columns, probes=probes, settings=settings,
                 interventions=interventions, dtype=dtype, device=device, versions=versions)
        return cls.from_json(d)

    @classmethod
    def from_json(cls, d: dict) -> Manifest:
        """Read a manifest object; lenient (a malformed entry is kept as found, for problems() to name)."""
        if not isinstance(d, dict):
            raise TypeError(f"a manifest is a JSON object, not {type(d).__name__}")
        m = _from(cls, d)
        if isinstance(m.parts, list):
            m.parts = [Part.from_json(p) if isinstance(p, dict) else p for p in m.parts]
        if isinstance(m.settings, dict):
            m.settings = CaptureSettings.from_json(m.settings)
        return m

    def to_json(self) -> dict:
        return _to(self)

    def part_problems(self) -> list[str]:
        """What the store refuses to open: parts it cannot list or that point outside the run."""
        if self.parts is _MISSING or self.parts is None:
            return ["it lists no parts"]
        if not isinstance(self.parts, list):
            return ["its parts entry is not a list"]
        for i, part in enumerate(self.parts):
            why = part.problems(i) if isinstance(part, Part) else [f"part {i} is malformed"]
            if why:
                return why
        return []

    def problems(self) -> list[str]:
        """Why this manifest cannot be trusted: part_problems(), then settings and schema version; [] when sound."""
        out = self.part_problems()
        if out:
            return out
        if isinstance(self.settings, CaptureSettings):
            out += self.settings.problems()
        if _present(self.schema_version) and self.schema_version != SCHEMA_VERSION:
            out.append(f"schema version {self.schema_version!r} is not {SCHEMA_VERSION}")
        return out

    @property
    def n_tokens(self) -> int:
        """Tokens in the committed parts."""
        return sum(p.tokens for p in self.parts) if isinstance(self.parts, list) else 0

    @property
    def complete(self) -> bool:
        return self.status == "complete"


def problem(m) -> str | None:
    """The first reason the store refuses a raw manifest object (its parts), or None."""
    if not isinstance(m, dict):
        return "not a JSON object"
    found = Manifest.from_json(m).part_problems()
    return found[0] if found else None
