"""TorchServe handler of a pixtok depth archive (handler.py at the root of the .mar).

It runs from the archive alone: pixtok_model/ beside it holds the inference core, the ViT and
DepthViT code and the resize function training used; the weights are model.safetensors (or
model.onnx).
"""
from pixtok_model.depth import DepthViT
from pixtok_model.depth_estimator import load_depth_estimator
from pixtok_model.handler_base import PixtokHandler
from pixtok_model.resize import resize_image


def build_depth_vit(spec: dict) -> DepthViT:
    return DepthViT.from_args(spec["args"])


class DepthHandler(PixtokHandler):
    """Image bytes -> {"width", "height", "unit", "min", "max", "depth_png"}."""

    def load(self, model_dir, device):
        return load_depth_estimator(model_dir, build_depth_vit, resize_image, device)
