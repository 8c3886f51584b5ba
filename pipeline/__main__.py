"""Command line: ``python -m pipeline <command> ...``.

Commands:
  run         one scene: stack, infer, stitch, clean, vectorize -> GeoPackage
  region      the nightly job over many scenes on a Dask cluster (resumable)
  validate    check a scene config and its inputs without processing
  stack       stack a scene onto the 10 m grid and write it as a COG
  demo-data   write a small synthetic Sentinel-2 L2A product and DEM
  train       train a model from Landslide4Sense-style patches
  evaluate    pixel/object metrics and model comparison tables
  config-docs write docs/configuration.md and docs/schema/*.schema.json from the config models
  view        serve a run's or a region's HTML map report on localhost
  app         the interactive model comparison in a browser (upload a patch)
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Callable, Sequence

from pipeline import __version__
from pipeline.core.errors import PipelineError

log = logging.getLogger("pipeline")

# command -> (module, add-arguments function, handler, help)
_COMMANDS: dict[str, tuple[str, str, str, str]] = {
    "run": ("pipeline.cli.run", "add_run_arguments", "cli_run", "process one scene end to end"),
    "region": ("pipeline.cli.region", "add_region_arguments", "cli_region", "process many scenes (nightly job), resumable"),
    "validate": ("pipeline.cli.validate", "add_validate_arguments", "cli_validate", "check a scene config and its inputs"),
    "stack": ("pipeline.cli.stack", "add_stack_arguments", "cli_stack", "stack a scene and write the 14-channel COG"),
    "demo-data": ("pipeline.cli.demo", "add_demo_arguments", "cli_demo", "write a synthetic Sentinel-2 L2A product + DEM"),
    "train": ("pipeline.cli.train", "add_train_arguments", "cli_train", "train a segmentation model"),
    "evaluate": ("pipeline.cli.evaluate", "add_evaluate_arguments", "cli_evaluate", "evaluate models and outputs"),
    "config-docs": ("pipeline.cli.config_docs", "add_config_docs_arguments", "cli_config_docs",
                    "write the configuration reference and JSON Schemas (docs/)"),
    "view": ("pipeline.cli.view", "add_view_arguments", "cli_view", "serve a run's or region's HTML report on localhost"),
    "app": ("pipeline.cli.app", "add_app_arguments", "cli_app", "the interactive model comparison in a browser (upload a patch)"),
}


def _configure_logging(verbosity: int, quiet: bool) -> None:
    level = logging.WARNING if quiet else (logging.DEBUG if verbosity > 0 else logging.INFO)
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    for noisy in ("rasterio", "distributed", "fiona", "pyogrio", "urllib3", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))


def _chosen_command(argv: Sequence[str]) -> str | None:
    return next((a for a in argv if not a.startswith("-")), None)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The CLI parser; only ``command``'s module is imported (keeps ``--help`` fast)."""
    parser = argparse.ArgumentParser(
        prog="python -m pipeline",
        description="Landslide mapping from Sentinel-2 and a DEM.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, (module, add_args, _handler, help_text) in _COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name != command:
            continue
        try:
            mod = importlib.import_module(module)
        except ImportError as exc:  # pragma: no cover - broken install
            p.set_defaults(_broken=f"{name}: unavailable ({exc})")
            continue
        getattr(mod, add_args)(p)
        p.set_defaults(_handler=(module, _handler))
    return parser


def _out_of_room(exc: BaseException) -> str | None:
    """One line for a full disk (or a file size limit) that reached the command line unwrapped:
    the writers raise :class:`~pipeline.core.errors.DiskFull` themselves; this is the net below them
    (an ``[Errno 28]``, SQLite's ``database or disk is full``). ``None`` for other errors."""
    import errno

    from pipeline.core.fsutil import free_bytes, megabytes

    text = str(exc).lower()
    code = exc.errno if isinstance(exc, OSError) else None
    if code in (errno.ENOSPC, errno.EDQUOT) or "database or disk is full" in text or "no space left" in text:
        what = "no space left on the device"
    elif code == errno.EFBIG or "file too large" in text:
        what = "the file size limit of this process (ulimit -f) was reached"
    else:
        return None
    filename = getattr(exc, "filename", None)
    if filename:
        from pathlib import Path

        folder = Path(filename).parent
        free = free_bytes(folder)
        where = f" while writing {Path(filename).name}" + (f" ({megabytes(free)} free)" if free is not None else "")
        return f"{folder}: {what}{where}; free space there or choose another output folder (output.dir, or --out for stack)"
    return f"{what} ({exc}); free space or choose another output folder (output.dir, or --out for stack)"


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(_chosen_command(argv))
    args = parser.parse_args(argv)
    _configure_logging(args.verbose, args.quiet)
    if getattr(args, "_broken", None):
        print(f"error: {args._broken}", file=sys.stderr)
        return 2
    module, handler_name = args._handler
    handler: Callable[[argparse.Namespace], int] = getattr(importlib.import_module(module), handler_name)
    try:
        return int(handler(args) or 0)
    except PipelineError as exc:
        # DiskFull (an OutputError) among them: one line naming the output folder
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        message = _out_of_room(exc)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; no partial outputs were left at their final paths", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
