"""pixtok: train, export and serve pixel transformers (ViT/1, DiT/1)."""
__version__ = "0.1.0"
