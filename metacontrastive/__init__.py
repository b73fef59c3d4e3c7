"""Domain-Conditioned Meta-Contrastive Learning for CLIP-style vision-language models."""

__version__ = "0.1.0"
