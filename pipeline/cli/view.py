"""``python -m pipeline view PATH``: serve a run's or a region's HTML report on localhost.

PATH is a run folder, a ``report.html``, a scene folder (its ``LATEST`` run is shown) or a
region's output folder (its ``<name>.report.html``; with several regions in one folder, each is
listed). A run or region written before HTML reports existed (a ``report.json`` or a
``<name>.region_state.json`` but no page) gets its page made in memory: nothing is written.

The server listens on 127.0.0.1 only (a free port unless ``--port``), serves the report's folder
(so the page's links to the GeoPackages and to the scenes' own reports work), prints the
address, opens a browser only with ``--open`` and where there is a display, and stops on Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import os
import sys
import threading
import webbrowser
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlsplit

from pipeline.core.errors import ConfigError, InputError

log = logging.getLogger(__name__)

HOST = "127.0.0.1"


def add_view_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``python -m pipeline view``."""
    parser.add_argument("path", type=Path,
                        help="a run folder, a report.html, a scene folder (with LATEST) or a region output folder")
    parser.add_argument("--port", type=int, default=0,
                        help="port on 127.0.0.1 (default: a free one)")
    parser.add_argument("--open", action="store_true",
                        help="open the report in a web browser (only where there is a display)")


@dataclass
class ViewTarget:
    """What to serve: the folder ``root``, the report pages (paths relative to it, the first the
    main one), and pages made in memory (path -> HTML) for runs or regions without a page."""

    root: Path
    pages: list[str]
    generated: dict[str, bytes] = field(default_factory=dict)


def _run_target(run_dir: Path) -> ViewTarget:
    from pipeline.report import REPORT_HTML, render_html_report
    from pipeline.run.folder import REPORT

    if (run_dir / REPORT_HTML).is_file():
        return ViewTarget(run_dir, [REPORT_HTML])
    report_json = run_dir / REPORT
    if report_json.is_file():
        try:
            report = json.loads(report_json.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise InputError(f"{report_json}: cannot read the run's report: {exc}") from None
        log.info("%s has no %s (an earlier run): making the page in memory", run_dir, REPORT_HTML)
        return ViewTarget(run_dir, [REPORT_HTML], {REPORT_HTML: render_html_report(run_dir, report)})
    raise InputError(f"{run_dir}: no {REPORT_HTML} and no {REPORT}: not a completed run folder")


def _region_target(folder: Path) -> ViewTarget | None:
    from pipeline.report import (
        REGION_REPORT_SUFFIX,
        region_report_path,
        region_state_arguments,
        render_region_report,
    )
    from pipeline.run.region import STATE_SUFFIX

    pages = sorted(p.name for p in folder.glob(f"*{REGION_REPORT_SUFFIX}") if p.is_file())
    generated: dict[str, bytes] = {}
    for state in sorted(folder.glob(f"*{STATE_SUFFIX}")):
        try:
            kwargs: dict[str, Any] = region_state_arguments(state)
        except ValueError:
            continue
        name = region_report_path(folder, kwargs["name"]).name
        if name not in pages:
            kwargs["out_dir"] = folder
            generated[name] = render_region_report(**kwargs)
            pages.append(name)
    return ViewTarget(folder, pages, generated) if pages else None


def resolve_target(path: Path) -> ViewTarget:
    """What ``view`` serves for ``path``; raises :class:`~pipeline.core.errors.InputError` when
    there is no report there."""
    from pipeline.report import REPORT_HTML
    from pipeline.run.folder import LATEST, REPORT
    from pipeline.run.region import STATE_SUFFIX

    path = Path(path).expanduser()
    if not path.exists():
        raise InputError(f"{path}: no such file or folder")
    if path.is_file():
        if path.suffix.lower() in (".html", ".htm"):
            return ViewTarget(path.parent.resolve(), [path.name])
        if path.name == REPORT:
            return _run_target(path.parent.resolve())
        if path.name.endswith(STATE_SUFFIX):
            target = _region_target(path.parent.resolve())
            if target is not None:
                return target
        raise InputError(f"{path}: not a report (give a run folder, a report.html, a scene folder or a region "
                         "output folder)")
    folder = path.resolve()
    if (folder / REPORT_HTML).is_file() or (folder / REPORT).is_file():
        return _run_target(folder)
    if (folder / LATEST).is_file():
        name = (folder / LATEST).read_text(encoding="utf-8").strip()
        run_dir = folder / name
        if not name or not run_dir.is_dir():
            raise InputError(f"{folder / LATEST} names {name!r}, which is not a run folder in {folder}")
        return _run_target(run_dir)
    target = _region_target(folder)
    if target is not None:
        return target
    raise InputError(f"{folder}: no report here: expected {REPORT_HTML} or {REPORT} (a run folder), {LATEST} (a "
                     f"scene folder), or a region's <name>.report.html or <name>{STATE_SUFFIX}")


class _Handler(SimpleHTTPRequestHandler):
    """Files of the served folder, and the pages made in memory; quiet (debug log)."""

    generated: dict[str, bytes] = {}
    main_page: str = ""

    def __init__(self, *args: Any, generated: dict[str, bytes], main_page: str, **kwargs: Any) -> None:
        self.generated = generated
        self.main_page = main_page
        super().__init__(*args, **kwargs)

    def _page(self) -> bytes | None:
        path = unquote(urlsplit(self.path).path).lstrip("/")
        return self.generated.get(path)

    def send_head(self) -> Any:  # noqa: ANN401 - as the base class
        if urlsplit(self.path).path == "/" and self.main_page:
            self.send_response(HTTPStatus.FOUND)
            self.send_header("Location", "/" + quote(self.main_page))
            self.send_header("Content-Length", "0")
            self.end_headers()
            return None
        page = self._page()
        if page is None:
            return super().send_head()
        import io

        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(page)))
        self.end_headers()
        return io.BytesIO(page)

    def end_headers(self) -> None:
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        super().end_headers()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        log.debug("%s %s", self.address_string(), format % args)


def make_server(target: ViewTarget, port: int = 0) -> ThreadingHTTPServer:
    """A server of ``target`` on 127.0.0.1:``port`` (0: a free port), not yet serving."""
    handler = functools.partial(_Handler, directory=str(target.root), generated=target.generated,
                                main_page=target.pages[0] if target.pages else "")
    try:
        server = ThreadingHTTPServer((HOST, port), handler)
    except OSError as exc:
        raise ConfigError(f"cannot listen on {HOST}:{port} ({exc.strerror or exc}); choose another --port, or "
                          "leave it out for a free one") from None
    server.daemon_threads = True
    return server


def page_urls(server: ThreadingHTTPServer, target: ViewTarget) -> list[str]:
    host, port = server.server_address[:2]
    return [f"http://{host}:{port}/{quote(p)}" for p in target.pages]


def has_display() -> bool:
    """Whether a browser could show a window here."""
    if sys.platform in ("darwin", "win32"):
        return True
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def cli_view(args: argparse.Namespace) -> int:
    """Serve the report until Ctrl-C."""
    target = resolve_target(args.path)
    server = make_server(target, args.port)
    urls = page_urls(server, target)
    try:
        made = " (made in memory: no report.html was written)" if target.generated else ""
        print(f"serving {target.root} on 127.0.0.1 only{made}; press Ctrl-C to stop")
        for url in urls:
            print(url)
        sys.stdout.flush()
        if args.open:
            if has_display():
                threading.Thread(target=webbrowser.open, args=(urls[0],), daemon=True).start()
            else:
                print("no display here: open the address in a browser (an SSH tunnel works: ssh -L "
                      f"{server.server_address[1]}:127.0.0.1:{server.server_address[1]} ...)")
                sys.stdout.flush()
        with contextlib.suppress(KeyboardInterrupt):
            server.serve_forever()
        print("stopped")
    finally:
        server.server_close()
    return 0
