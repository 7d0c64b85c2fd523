"""The DeMem context manager (a facade over its parts in this package) and its statistics."""

from demem_ext.middleware.accumulation import CHUNK_BUDGET_BYTES, default_chunk_rows
from demem_ext.middleware.demem import DeMem
from demem_ext.middleware.stats import DeMemStats

__all__ = ["CHUNK_BUDGET_BYTES", "DeMem", "DeMemStats", "default_chunk_rows"]
