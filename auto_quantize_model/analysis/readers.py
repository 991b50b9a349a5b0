"""Read the layers and trials tables into pandas, with unified schemas and no duplicate trials.

A pyarrow dataset takes its schema from one file unless told otherwise, which silently drops a
column that only later trials wrote; these readers unify every file's schema first.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from auto_quantize_model.errors import UserError
from auto_quantize_model.records.tables import PARTITION

Filters = list[tuple[str, str, Any]] | dict[str, Any] | None


def _table_dir(path: str | Path, name: str) -> Path:
    p = Path(path)
    if (p / name).is_dir():
        return p / name
    if (p / "tables" / name).is_dir():
        return p / "tables" / name
    if p.name == name and p.is_dir():
        return p
    raise UserError(f"no {name} table under {p}; run `autoquant analyze` or a sweep to create it")


def _expression(filters: Filters):
    if not filters:
        return None
    if isinstance(filters, dict):
        filters = [(k, "in" if isinstance(v, list | tuple | set) else "==", v) for k, v in filters.items()]
    return pq.filters_to_expression([tuple(f) for f in filters])


def _dataset(directory: Path) -> ds.Dataset:
    part = ds.partitioning(pa.schema([pa.field(PARTITION, pa.string())]), flavor="hive")
    first = ds.dataset(directory, format="parquet", partitioning=part)
    files = first.files
    if not files:
        raise UserError(f"{directory} holds no parquet files")
    schemas = [pq.read_schema(f) for f in files]
    unified = pa.unify_schemas([*schemas, pa.schema([pa.field(PARTITION, pa.string())])])
    return ds.dataset(files, schema=unified, format="parquet", partitioning=part,
                      partition_base_dir=str(directory))


def _load(path: str | Path, name: str, filters: Filters, columns: list[str] | None) -> pd.DataFrame:
    dataset = _dataset(_table_dir(path, name))
    table = dataset.to_table(filter=_expression(filters), columns=columns)
    df = table.to_pandas()
    if "trial_id" in df and "written_at" in df:
        # A trial re-written under a different partition (e.g. a renamed scheme) keeps its newest copy.
        df = df.sort_values("written_at").drop_duplicates(["sweep_id", "trial_id"], keep="last")
    return df.reset_index(drop=True)


def load_trials(path: str | Path, filters: Filters = None, columns: list[str] | None = None) -> pd.DataFrame:
    """One row per trial. ``filters``: ``{"scheme": "fp8_autoquant_top50"}`` or
    ``[("effective_bits_target", "<=", 12)]`` (pyarrow filter tuples)."""
    return _load(path, "trials", filters, columns)


def load_layers(path: str | Path, filters: Filters = None, columns: list[str] | None = None) -> pd.DataFrame:
    """One row per trial and LM Linear layer (same filters as :func:`load_trials`)."""
    df = _load(path, "layers", filters, columns)
    if {"trial_id", "layer"} <= set(df.columns):
        df = df.drop_duplicates(["sweep_id", "trial_id", "layer"], keep="last").reset_index(drop=True)
    return df
