"""Container health: a real prediction from the classifier, not TorchServe's /ping (which answers
Healthy even while workers crash-loop). Exit 0 when healthy, 1 otherwise."""
from __future__ import annotations

import io
import os
import sys

from PIL import Image


def probe_image() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (28, 28), (128, 64, 32)).save(buf, format="PNG")
    return buf.getvalue()


def main() -> int:
    from serving.client import DEFAULT_MODELS, Client

    model = os.environ.get("PIXTOK_CLASSIFIER", DEFAULT_MODELS["classify"])
    try:
        answer = Client(timeout=20, retry_seconds=0).classify(probe_image(), model=model)
        if "label" not in answer:
            raise ValueError(f"unexpected answer {answer}")
    except Exception as e:  # noqa: BLE001 - any failure means unhealthy; say why in one line
        print(f"unhealthy: {e}", file=sys.stderr)
        return 1
    print("healthy")
    return 0


if __name__ == "__main__":
    sys.exit(main())
