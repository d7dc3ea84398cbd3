"""What an analysis returns: named polars tables, the main one, a summary and metadata."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import polars as pl


@dataclass
class AnalysisResult:
    name: str
    tables: dict[str, pl.DataFrame]
    main: str
    summary: str = ""
    meta: dict = field(default_factory=dict)

    @property
    def table(self) -> pl.DataFrame:
        return self.tables[self.main]

    def __repr__(self) -> str:
        shapes = ", ".join(f"{k}{tuple(v.shape)}" for k, v in self.tables.items())
        return f"AnalysisResult({self.name!r}, main={self.main!r}, tables=[{shapes}])"
