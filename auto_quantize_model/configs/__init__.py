"""Scheme catalog and scheme files."""

from auto_quantize_model.configs.schemes import (
    AUTOQUANT_FP8_SCHEMES,
    Scheme,
    get_scheme,
    load_schemes_file,
    resolve_scheme,
    scheme_catalog,
)

__all__ = ["AUTOQUANT_FP8_SCHEMES", "Scheme", "get_scheme", "load_schemes_file", "resolve_scheme", "scheme_catalog"]
