"""``python -m pipeline app``: the interactive model comparison in a browser (upload a patch).

Serves :mod:`pipeline.app` on 127.0.0.1 only (a free port unless ``--port``) and prints its
address; a browser opens only with ``--open`` and where there is a display. The shipped models are
offered, and every artefact given with ``--model`` (repeatable). Ctrl-C stops it.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import threading
import webbrowser
from pathlib import Path

from pipeline.app.server import DEFAULT_KEEP, DEFAULT_MAX_UPLOAD_MB, HOST


def add_app_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``python -m pipeline app``."""
    parser.add_argument("--model", type=Path, action="append", default=[], metavar="PATH",
                        help="a model artefact (.safetensors) to offer besides the shipped ones (repeatable)")
    parser.add_argument("--no-shipped", action="store_true",
                        help="offer only the --model artefacts, not the shipped models")
    parser.add_argument("--port", type=int, default=0, help=f"port on {HOST} (default: a free one)")
    parser.add_argument("--open", action="store_true",
                        help="open the page in a web browser (only where there is a display)")
    parser.add_argument("--max-upload-mb", type=float, default=DEFAULT_MAX_UPLOAD_MB,
                        help=f"largest upload accepted, in MB (default {DEFAULT_MAX_UPLOAD_MB})")
    parser.add_argument("--keep", type=int, default=DEFAULT_KEEP,
                        help=f"results kept in memory, the latest uploads (default {DEFAULT_KEEP})")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "mps"),
                        help="where the models run (default auto: a GPU when there is one)")
    parser.add_argument("--overlap", type=int, default=32,
                        help="pixels shared by neighbouring windows on chips larger than a window (default 32)")
    parser.add_argument("--threads", type=int, default=None,
                        help="PyTorch threads on the CPU (default: PyTorch's own choice)")


def cli_app(args: argparse.Namespace) -> int:
    """Serve the comparison app until Ctrl-C."""
    from pipeline.app import build_catalogue, make_app_server
    from pipeline.cli.view import has_display
    from pipeline.inference.options import InferenceOptions

    catalogue = build_catalogue(args.model, shipped=not args.no_shipped)
    options = InferenceOptions(device=args.device, overlap=args.overlap, block_size=1024,
                               torch_threads=args.threads)
    server = make_app_server(catalogue, options, port=args.port, max_upload_mb=args.max_upload_mb, keep=args.keep)
    try:
        print(f"model comparison on {HOST} only, {len(catalogue)} model(s): "
              + ", ".join(e.name for e in catalogue.entries) + "; press Ctrl-C to stop")
        print(server.url)
        sys.stdout.flush()
        if args.open:
            if has_display():
                threading.Thread(target=webbrowser.open, args=(server.url,), daemon=True).start()
            else:
                port = server.server_address[1]
                print(f"no display here: open the address in a browser (an SSH tunnel works: ssh -L "
                      f"{port}:127.0.0.1:{port} ...)")
                sys.stdout.flush()
        with contextlib.suppress(KeyboardInterrupt):
            server.serve_forever()
        print("stopped")
    finally:
        server.server_close()
    return 0
