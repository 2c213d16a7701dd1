"""Container health: a real prediction from a served model, not TorchServe's /ping (which answers
Healthy even while workers crash-loop). The model: $PIXTOK_CLASSIFIER, else the first classifier
the run folder's server serves, else its first depth model, else a one-step sample of its first
generator (a store that is not ours is checked too). Exit 0 when healthy, 1 otherwise."""
from __future__ import annotations

import io
import os
import sys

from PIL import Image


def probe_image() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (28, 28), (128, 64, 32)).save(buf, format="PNG")
    return buf.getvalue()


def probe(client) -> dict:
    """One real request to a served model -> its answer (checked by the caller)."""
    from serving.client import DEFAULT_MODELS, default_run_dir
    from serving.page_settings import served_models

    if os.environ.get("PIXTOK_CLASSIFIER"):
        return client.classify(probe_image(), model=os.environ["PIXTOK_CLASSIFIER"])
    served = served_models(default_run_dir())
    if served.get("classify") or not served:
        return client.classify(probe_image(), model=(served.get("classify") or
                                                     [DEFAULT_MODELS["classify"]])[0])
    if served.get("depth"):
        return client.depth(probe_image(), model=served["depth"][0])
    return client.generate(0, model=served["generate"][0], steps=1, num_images=1)


def main() -> int:
    from serving.client import Client

    try:
        answer = probe(Client(timeout=20, retry_seconds=0))
        if not {"label", "depth_png", "images"} & set(answer):
            raise ValueError(f"unexpected answer {str(answer)[:200]}")
    except Exception as e:  # noqa: BLE001 - any failure means unhealthy; say why in one line
        print(f"unhealthy: {e}", file=sys.stderr)
        return 1
    print("healthy")
    return 0


if __name__ == "__main__":
    sys.exit(main())
