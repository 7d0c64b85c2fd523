"""Adapters of the DeMem block to training frameworks (optional extras: each imports its framework)."""
