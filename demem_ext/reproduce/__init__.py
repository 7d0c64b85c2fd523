"""`demem reproduce`: the paper's comparison on shadow models, and its report."""

from demem_ext.reproduce.configs import (ALL_SLUGS, DP_MATCH_SLUGS, SLUGS, VARIANT_SLUGS, configurations, demem_fields,
                                         parse_configs)
from demem_ext.reproduce.rows import choose_lambda
from demem_ext.reproduce.run import parse_seeds, reproduce

__all__ = ["ALL_SLUGS", "DP_MATCH_SLUGS", "SLUGS", "VARIANT_SLUGS", "choose_lambda", "configurations", "demem_fields",
           "parse_configs", "parse_seeds", "reproduce"]
