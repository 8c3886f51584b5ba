"""The app's HTTP server on 127.0.0.1: the upload form, the comparisons, their images and downloads.

Routes: ``GET /`` the form; ``POST /upload`` runs the chosen models and redirects (303) to
``/result/<id>``; ``GET /result/<id>/<file>`` serves ``rgb.png``, ``agreement.png`` and per model
``<model>-probability.png``, ``-mask.png``, ``-overlay.png``, ``-probability.npy``,
``-probability.tif``, ``-mask.npy``, ``-mask.tif``. A refused upload gets the form again with the
message, status 400 (413 for a body over the limit, refused from its ``Content-Length`` before any
of it is read); no request stops the server. One comparison runs at a time; the last ``keep`` stay
in memory.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

from pipeline.app import pages, render
from pipeline.app.catalogue import Catalogue
from pipeline.app.compare import Comparison, ResultStore, compare
from pipeline.app.form import UploadError, parse_form
from pipeline.app.inputs import read_upload
from pipeline.core.errors import ConfigError, PipelineError
from pipeline.inference.options import InferenceOptions

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
DEFAULT_MAX_UPLOAD_MB = 512
DEFAULT_KEEP = 20
_RESULT = re.compile(r"^/result/([0-9a-f]{1,64})(?:/([A-Za-z0-9._-]{1,120}))?/?$")
_MODEL_FILES = ("probability.png", "mask.png", "overlay.png", "probability.npy", "probability.tif",
                "mask.npy", "mask.tif")
_TYPES = {".png": "image/png", ".npy": "application/octet-stream", ".tif": "image/tiff"}
_LEVELS = ("L1C", "L2A")


class AppServer(ThreadingHTTPServer):
    """A threading HTTP server that holds the app's models, options and results."""

    daemon_threads = True

    def __init__(self, catalogue: Catalogue, options: InferenceOptions, *, port: int = 0,
                 max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB, keep: int = DEFAULT_KEEP) -> None:
        self.catalogue = catalogue
        self.options = options
        self.max_upload_bytes = int(max_upload_mb * 1024 * 1024)
        self.store = ResultStore(keep)
        self.run_lock = threading.Lock()
        super().__init__((HOST, port), _Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/"


def make_app_server(catalogue: Catalogue, options: InferenceOptions | None = None, *, port: int = 0,
                    max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB, keep: int = DEFAULT_KEEP) -> AppServer:
    """The app on 127.0.0.1:``port`` (0: a free port), not yet serving; :class:`ConfigError` when
    the port cannot be had or the limits make no sense."""
    if max_upload_mb <= 0:
        raise ConfigError(f"--max-upload-mb must be positive, got {max_upload_mb}")
    try:
        return AppServer(catalogue, options or InferenceOptions(), port=port, max_upload_mb=max_upload_mb, keep=keep)
    except OSError as exc:
        raise ConfigError(f"cannot listen on {HOST}:{port} ({exc.strerror or exc}); choose another --port, or "
                          "leave it out for a free one") from None


class _Handler(BaseHTTPRequestHandler):
    server: AppServer
    server_version = "landslide-app"

    # -- routing ----------------------------------------------------------------------------------
    def do_GET(self) -> None:  # noqa: N802 - the base class's name
        path = urlsplit(self.path).path
        if path in ("/", "/index.html"):
            self._send(HTTPStatus.OK, self._form(), "text/html; charset=utf-8")
            return
        match = _RESULT.match(path)
        if match is None:
            self._not_found("no such page")
            return
        comparison = self.server.store.get(match.group(1))
        if comparison is None:
            self._not_found("this result is unknown or no longer kept (only the last "
                            f"{self.server.store.capacity} uploads stay in memory): upload the file again")
        elif match.group(2) is None:
            self._send(HTTPStatus.OK, pages.result_page(comparison), "text/html; charset=utf-8")
        else:
            self._result_file(comparison, match.group(2))

    def do_POST(self) -> None:  # noqa: N802 - the base class's name
        if urlsplit(self.path).path != "/upload":
            self._not_found("no such page")
            return
        fields: dict[str, str] = {}
        try:
            comparison = self._upload(fields)
        except UploadError as exc:
            self._refuse(exc.status, str(exc), fields)
        except PipelineError as exc:
            self._refuse(HTTPStatus.BAD_REQUEST, str(exc), fields)
        except Exception as exc:  # noqa: BLE001 - the page says what went wrong; the server goes on
            log.exception("comparison failed")
            self._refuse(HTTPStatus.INTERNAL_SERVER_ERROR, f"the comparison failed: {type(exc).__name__}: {exc}", fields)
        else:
            self.send_response(HTTPStatus.SEE_OTHER)
            self.send_header("Location", pages.result_url(comparison))
            self.send_header("Content-Length", "0")
            self.end_headers()

    # -- the upload -------------------------------------------------------------------------------
    def _upload(self, fields: dict[str, str]) -> Comparison:
        body = self._body()
        form = parse_form(self.headers.get("Content-Type"), body)
        fields.update(form.fields)
        if not form.filename and len(form.data) == 0:
            raise UploadError("no file was uploaded: choose a Landslide4Sense .h5 patch or a GeoTIFF chip")
        try:
            entries = self.server.catalogue.choose(form.fields.get("model"))
        except KeyError as exc:
            raise UploadError(str(exc.args[0])) from None
        level = form.fields.get("level") or "L1C"
        if level not in _LEVELS:
            raise UploadError(f"unknown processing level {level!r}; choose {' or '.join(_LEVELS)}")
        image = read_upload(form.filename, form.data, form.fields.get("units") or None)
        del body, form
        with self.server.run_lock:
            comparison = compare(image, entries, self.server.options, level)
        self.server.store.add(comparison)
        log.info("compared %d model(s) on %s (%d x %d px): /result/%s", len(comparison.results),
                 image.filename, *image.shape, comparison.id)
        return comparison

    def _body(self) -> bytes:
        """The request body, refused from its declared length alone when over the limit."""
        declared = self.headers.get("Content-Length")
        if declared is None:
            raise UploadError("the upload has no Content-Length", HTTPStatus.LENGTH_REQUIRED)
        try:
            length = int(declared)
        except ValueError:
            raise UploadError(f"the upload's Content-Length {declared!r} is not a number") from None
        limit = self.server.max_upload_bytes
        if length > limit:
            self.close_connection = True  # the body is never read
            raise UploadError(f"the upload is {length / 1048576:.1f} MB, more than this server takes "
                              f"({limit / 1048576:.0f} MB; start it with a larger --max-upload-mb)",
                              HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
        if length <= 0:
            raise UploadError("the upload is empty: choose a Landslide4Sense .h5 patch or a GeoTIFF chip")
        body = self.rfile.read(length)
        if len(body) < length:
            raise UploadError(f"the upload was cut short ({len(body)} of {length} bytes arrived)")
        return body

    # -- result files -----------------------------------------------------------------------------
    def _result_file(self, comparison: Comparison, name: str) -> None:
        make = self._file_maker(comparison, name)
        if make is None:
            self._not_found(f"no file {name!r} in this result")
            return
        cached = name.endswith(".png")
        data = comparison.images.get(name) if cached else None
        if data is None:
            data = make()
            if cached:
                comparison.images[name] = data
        suffix = name[name.rfind("."):]
        download = None if cached else _download_name(comparison, name)
        self._send(HTTPStatus.OK, data, _TYPES[suffix], download=download, cache=True)

    @staticmethod
    def _file_maker(comparison: Comparison, name: str) -> Callable[[], bytes] | None:
        if name == "rgb.png":
            return lambda: render.rgb_png(comparison)
        if name == "agreement.png":
            return (lambda: render.agreement_png(comparison)) if len(comparison.results) > 1 else None
        model_id, _, what = name.rpartition("-")
        result = comparison.result(model_id)
        if result is None or what not in _MODEL_FILES:
            return None
        tags = render.model_tags(result)
        return {
            "probability.png": lambda: render.probability_png(result),
            "mask.png": lambda: render.mask_png(result),
            "overlay.png": lambda: render.overlay_png(comparison, result),
            "probability.npy": lambda: render.npy_bytes(result.probability),
            "mask.npy": lambda: render.npy_bytes(result.mask),
            "probability.tif": lambda: render.geotiff_bytes(comparison, result.probability,
                                                            description="landslide probability", tags=tags),
            "mask.tif": lambda: render.geotiff_bytes(comparison, result.mask, description="landslide mask", tags=tags),
        }[what]

    # -- responses --------------------------------------------------------------------------------
    def _form(self, error: str | None = None, fields: dict[str, str] | None = None) -> bytes:
        return pages.upload_form(self.server.catalogue, self.server.max_upload_bytes, error=error, fields=fields,
                                 keep=self.server.store.capacity)

    def _refuse(self, status: int, message: str, fields: dict[str, str]) -> None:
        log.info("upload refused (%d): %s", status, message)
        self._send(status, self._form(message, fields), "text/html; charset=utf-8")

    def _not_found(self, message: str) -> None:
        self._send(HTTPStatus.NOT_FOUND, pages.message_page("Not found", message), "text/html; charset=utf-8")

    def _send(self, status: int, data: bytes, content_type: str, *, download: str | None = None,
              cache: bool = False) -> None:
        try:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Cache-Control", "private, max-age=3600" if cache else "no-store")
            self.send_header("X-Content-Type-Options", "nosniff")
            if download:
                self.send_header("Content-Disposition", f'attachment; filename="{download}"')
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            log.debug("the client went away before the response was sent")

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        log.debug("%s %s", self.address_string(), format % args)


def _download_name(comparison: Comparison, name: str) -> str:
    """``<upload stem>_<model id>-<file>``, in safe ASCII."""
    stem = comparison.source.filename.rsplit(".", 1)[0] or "upload"
    return re.sub(r"[^A-Za-z0-9._-]+", "_", f"{stem}_{name}")[:150]
