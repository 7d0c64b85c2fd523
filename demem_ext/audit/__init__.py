"""The membership-inference audit (the application layer): shadow models, attacks, reports, Python API."""

from demem_ext.audit.api import audit_config, audit_logits, audit_train_fn
from demem_ext.audit.queries import QueryTransform, query_transforms
from demem_ext.audit.report import format_report, run_audit

__all__ = ["QueryTransform", "audit_config", "audit_logits", "audit_train_fn", "format_report", "query_transforms", "run_audit"]
