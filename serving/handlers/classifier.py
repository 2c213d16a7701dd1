"""TorchServe handler of a pixtok classifier archive (handler.py at the root of the .mar).

It runs from the archive alone: the pixtok/ package beside it holds the inference core, the ViT
code and the resize function training used; the weights are model.safetensors (or model.onnx).
"""
import os
import sys

# the archive's own copy of the pixtok core runs, whatever else the Python environment holds
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from pixtok.inference.core import load_core  # noqa: E402
from pixtok.inference.handler_base import PixtokHandler  # noqa: E402


class ClassifierHandler(PixtokHandler):
    """Image bytes -> {"label", "index", "score", "top_k"}."""

    def load(self, model_dir, device):
        return load_core("classify", model_dir, device)
