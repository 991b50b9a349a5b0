"""Arrow/Parquet tables from manifests, pandas readers, and cross-scheme analysis."""

from auto_quantize_model.analysis.readers import load_layers, load_trials

__all__ = ["load_layers", "load_trials"]
