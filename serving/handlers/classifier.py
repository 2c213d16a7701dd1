"""TorchServe handler of a pixtok classifier archive (handler.py at the root of the .mar).

It runs from the archive alone: pixtok_model/ beside it holds the inference core, the ViT code
and the resize function training used; the weights are model.safetensors (or model.onnx).
"""
from pixtok_model.handler_base import PixtokHandler
from pixtok_model.inference import load_classifier
from pixtok_model.resize import resize_image
from pixtok_model.vit import ViT, ViTConfig


def build_vit(spec: dict) -> ViT:
    return ViT(ViTConfig(**spec["args"]))


class ClassifierHandler(PixtokHandler):
    """Image bytes -> {"label", "index", "score", "top_k"}."""

    def load(self, model_dir, device):
        return load_classifier(model_dir, build_vit, resize_image, device)
