"""mpo: Mixed Preference Optimization for vision-language models (InternVL2.5-MPO recipe)."""

__version__ = "0.1.0"
