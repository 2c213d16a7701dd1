"""The Gradio front end of `pixtok serve`: a browser page over the REST API; it holds no model.

Every action is one REST call through serving.client.Client, which finds the server and its key
in the run folder and renews the key when TorchServe rolls it over. Generate streams its request
("stream": true): each sampler step moves a gr.Progress bar, Stop cancels the run (the page is
free at once; the run closes its stream at the next step), "Random seed" draws the seed, and
class buttons and examples under the form fill it in. The page serves the store it is given: a
tab, and a gradio_client API name, only for each task the server serves (Generate /generate,
Classify /classify, Depth /depth), read from the run folder's config.properties and the archives
it names, with a model picker where a task has several models (each endpoint's last input,
`model`). Uploaded files are forwarded to the server as they are (the event skips Gradio's own
image decoding), so a file that is not an image gets the server's own message. Example inputs
live in the run folder (ui/examples/): real Fashion-MNIST test images (when the Debian data set
is installed) and scenes rendered by training/data/scenes.py; the launcher writes them before it
starts the app (it has torch loaded already).

A page that listens beyond loopback (--host other than 127.0.0.1, ::1, localhost) asks for a
login: user `pixtok`, password $PIXTOK_UI_PASSWORD or the run folder's ui_password file (mode
0600), which `pixtok serve` writes with a fresh password at each start. --login asks for it on
loopback too.

This file starts the page (make_app, the command line); its parts, each importing only those
before it (and serving.client, serving.page_settings, pixtok):
    serving/page_models.py   the served models as the page shows them, and their examples
    serving/page_actions.py  what the buttons do: one REST call each; depth maps coloured
    serving/page_layout.py   the tabs, their forms and events, build_app

    python -m serving.gradio_app [--host 127.0.0.1] [--port 7860] [--run-dir DIR] [--login]
                                 [--classifier N] [--depth-model N] [--generator N]
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from pixtok.errors import UserError
from pixtok.inference.validate import MAX_BODY_BYTES
from serving.client import Client, default_run_dir
from serving.page_actions import PageActions
from serving.page_layout import CSS, build_app
from serving.page_models import page_models, read_examples
from serving.page_settings import (
    MODEL_ENV,
    UI_PORT_ENV,
    UI_USER,
    examples_dir,
    needs_login,
    request_timeout,
    ui_login,
    ui_port,
)


def make_app(run_dir=None, models: dict | None = None, inference_url: str | None = None):
    """(app, examples folder): the page for the server of `run_dir`, with a tab for each task
    it serves. models ({task: name}) picks each task's first model."""
    run_dir = Path(run_dir or default_run_dir()).expanduser()
    client = Client(inference_url, run_dir, timeout=request_timeout())
    served = page_models(run_dir, models)
    print(f"pixtok ui: server {client.base_url}, models "
          f"{ {task: [m.name for m in ms] for task, ms in served.items()} }", flush=True)
    folder = examples_dir(run_dir)
    examples = read_examples(folder)
    return build_app(PageActions(client, served), examples), folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serving.gradio_app",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=None, help=f"default ${UI_PORT_ENV} or 7860")
    parser.add_argument("--run-dir", default=None, help="the server's run folder")
    parser.add_argument("--inference-url", default=None, help="default: from the run folder")
    parser.add_argument("--classifier", default=None, help=f"default ${MODEL_ENV['classify']}")
    parser.add_argument("--depth-model", default=None, help=f"default ${MODEL_ENV['depth']}")
    parser.add_argument("--generator", default=None, help=f"default ${MODEL_ENV['generate']}")
    parser.add_argument("--login", action="store_true",
                        help="ask for a login on loopback too (always asked beyond it)")
    args = parser.parse_args(argv)
    # no usage statistics, version checks or hub calls from this process (before gradio loads)
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        port = args.port or ui_port()
        run_dir = Path(args.run_dir or default_run_dir()).expanduser()
        auth = ui_login(run_dir) if needs_login(args.host, args.login) else None
        app, examples = make_app(args.run_dir, {"classify": args.classifier,
                                                    "depth": args.depth_model,
                                                    "generate": args.generator},
                                     args.inference_url)
    except UserError as e:
        print(f"pixtok ui: {e}", file=sys.stderr)
        return 2
    print(f"pixtok ui: serving http://{args.host}:{port}/"
          + (f" (login: user {UI_USER})" if auth else ""), flush=True)
    # Gradio's login is a form over plain HTTP: beyond a trusted network, put TLS in front
    app.launch(server_name=args.host, server_port=port, share=False, show_error=False,
               auth=auth, auth_message="pixtok: log in as user 'pixtok'" if auth else None,
               ssr_mode=False, mcp_server=False, pwa=False, footer_links=["api", "settings"],
               allowed_paths=[str(examples)], max_file_size=MAX_BODY_BYTES, quiet=True,
               css=CSS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
