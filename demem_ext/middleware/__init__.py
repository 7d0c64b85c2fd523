"""The DeMem context manager and its parts."""

from demem_ext.middleware.demem import CHUNK_BUDGET_BYTES, DeMem, DeMemStats, default_chunk_rows

__all__ = ["CHUNK_BUDGET_BYTES", "DeMem", "DeMemStats", "default_chunk_rows"]
