"""`demem reproduce`: the paper's comparison on shadow models, and its report."""

from demem_ext.reproduce.run import (ALL_SLUGS, SLUGS, VARIANT_SLUGS, choose_lambda, configurations,
                                     demem_fields, parse_configs, reproduce)

__all__ = ["ALL_SLUGS", "SLUGS", "VARIANT_SLUGS", "choose_lambda", "configurations", "demem_fields",
           "parse_configs", "reproduce"]
