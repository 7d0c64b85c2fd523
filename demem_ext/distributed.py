"""Deprecated: use `demem_ext.middleware.collectives` (this alias goes in the next release)."""

from demem_ext._compat import alias_module

alias_module(__name__, "demem_ext.middleware.collectives")
