"""TorchServe handler of a pixtok generator archive (handler.py at the root of the .mar).

It runs from the archive alone: pixtok_model/ beside it holds the sampling core, the DiT code and
the sampler presets (a copy of training/pipeline.py); the weights are transformer.safetensors and
vq_decoder.safetensors (the VQGAN's decoding half).
"""
from pixtok_model.dit import PixelDiT
from pixtok_model.handler_base import PixtokHandler, v2_generate_body
from pixtok_model.image_generator import load_generator
from pixtok_model.pipeline import DEFAULT_STEPS, make_scheduler


class GeneratorHandler(PixtokHandler):
    """JSON {"label", "seed", "steps", "sampler", "guidance", "num_images"} -> {"images", ...}.
    Under KServe v2 the same fields come as named inputs of one request."""

    def load(self, model_dir, device):
        return load_generator(model_dir, PixelDiT.from_config, make_scheduler, device,
                              DEFAULT_STEPS)

    def v2_bodies(self, inputs):
        return [(v2_generate_body(inputs), "application/json")]
