"""TorchServe handler of a pixtok generator archive (handler.py at the root of the .mar).

It runs from the archive alone: the pixtok/ package beside it holds the sampling core, the DiT
code and the sampler presets (pixtok/pipeline.py); the weights are transformer.safetensors and
vq_decoder.safetensors (the VQGAN's decoding half). A request with "stream": true hears of each
sampler step through TorchServe's intermediate responses (the only `ts` API it uses).
"""
import os
import sys

# the archive's own copy of the pixtok core runs, whatever else the Python environment holds
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from pixtok.inference.core import load_core  # noqa: E402
from pixtok.inference.handler_base import PixtokHandler, v2_generate_body  # noqa: E402


class GeneratorHandler(PixtokHandler):
    """JSON {"label", "seed", "steps", "sampler", "guidance", "num_images"} -> {"images", ...}.
    Under KServe v2 the same fields come as named inputs of one request."""

    def load(self, model_dir, device):
        return load_core("generate", model_dir, device)

    def send_intermediate(self, text, idx, context):
        # TorchServe sends it to the one request idx (not the whole batch) as an HTTP chunk
        from ts.protocol.otf_message_handler import send_intermediate_predict_response

        send_intermediate_predict_response({idx: text}, {idx: context.get_request_id(idx)},
                                           "Intermediate Prediction success", 200, context)

    def v2_bodies(self, inputs):
        return [(v2_generate_body(inputs), "application/json")]
