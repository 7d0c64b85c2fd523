"""Deprecated package: its modules moved to `demem_ext.audit` and `demem_ext.accounting` (aliases for one release)."""

import warnings

warnings.warn("demem_ext.privacy is deprecated and will be removed in the next release: use demem_ext.audit "
              "(attacks, metrics, memorization, shadow models, the audit) and demem_ext.accounting (ε)",
              DeprecationWarning, stacklevel=2)
