"""`workbench datasets`: argument parser and run."""

from __future__ import annotations

from .common import subparser


def add_parser(sub, argv=None) -> None:
    subparser(sub, "datasets", "list the bundled datasets", "List the bundled datasets with their sizes and label columns.")


def run(args) -> None:
    from ..data import bundled_datasets, load_dataset

    for name, path in bundled_datasets().items():
        ds = load_dataset(name)
        print(f"{name:24s} {len(ds.records):7d} records  {path.stat().st_size / 1e6:7.2f} MB  "
              f"labels: {', '.join(ds.label_columns) or '-'}")
