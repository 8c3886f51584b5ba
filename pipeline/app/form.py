"""Reading the upload form: a ``multipart/form-data`` body split into its fields and one file.

The body is split on its boundary with bytes operations (no copy of the file's bytes: the file is a
:class:`memoryview` of the body); each part's header block is parsed with the standard library's
:mod:`email` package. Every problem is an :class:`UploadError` carrying the HTTP status and a
message for the page.
"""

from __future__ import annotations

import email.parser
import email.policy
from dataclasses import dataclass, field
from email.message import Message
from http import HTTPStatus

#: the form field that carries the file
FILE_FIELD = "file"
_HEADERS = email.parser.BytesParser(policy=email.policy.HTTP)


class UploadError(Exception):
    """A request the app refuses, with the HTTP ``status`` and a message for the page."""

    def __init__(self, message: str, status: int = HTTPStatus.BAD_REQUEST) -> None:
        super().__init__(message)
        self.status = int(status)


@dataclass
class Form:
    """The fields of a submitted form, and the uploaded file (``filename`` empty when none)."""

    fields: dict[str, str] = field(default_factory=dict)
    filename: str = ""
    data: memoryview = field(default_factory=lambda: memoryview(b""))


def boundary_of(content_type: str | None) -> bytes:
    """The multipart boundary of a ``Content-Type`` header; :class:`UploadError` when it is not
    ``multipart/form-data`` with a boundary."""
    msg = Message()
    msg["Content-Type"] = content_type or ""
    boundary = msg.get_param("boundary")
    if msg.get_content_type() != "multipart/form-data" or not isinstance(boundary, str) or not boundary:
        raise UploadError("the upload must be sent as multipart/form-data (use the form on the start page)")
    try:
        return boundary.encode("ascii")
    except UnicodeEncodeError:
        raise UploadError("the multipart boundary is not ASCII") from None


def parse_form(content_type: str | None, body: bytes) -> Form:
    """The fields and the file of a ``multipart/form-data`` ``body``."""
    delimiter = b"--" + boundary_of(content_type)
    view = memoryview(body)
    start = body.find(delimiter)
    if start < 0:
        raise UploadError("the upload is not a complete multipart form (no boundary found)")
    form = Form()
    pos = start + len(delimiter)
    while True:
        if body.startswith(b"--", pos):
            return form  # the closing delimiter
        if not body.startswith(b"\r\n", pos):
            raise UploadError("the upload is not a well-formed multipart form")
        end = body.find(b"\r\n" + delimiter, pos)
        if end < 0:
            raise UploadError("the upload was cut short (the form's closing boundary is missing)")
        _add_part(form, body, view, pos + 2, end)
        pos = end + 2 + len(delimiter)


def _add_part(form: Form, body: bytes, view: memoryview, start: int, end: int) -> None:
    """Add the part ``body[start:end]`` (headers, blank line, content) to ``form``."""
    split = body.find(b"\r\n\r\n", start, end)
    if split < 0:
        head, content = body[start:end], view[end:end]
    else:
        head, content = body[start:split], view[split + 4 : end]
    headers = _HEADERS.parsebytes(head + b"\r\n\r\n", headersonly=True)
    name = headers.get_param("name", header="content-disposition")
    if not isinstance(name, str):
        return
    filename = headers.get_param("filename", header="content-disposition")
    if name == FILE_FIELD:
        form.filename = _plain_name(filename) if isinstance(filename, str) else ""
        form.data = content
    else:
        form.fields[name] = bytes(content).decode("utf-8", errors="replace").strip()


def _plain_name(filename: str) -> str:
    """The file's name without any folder a browser sent along (``C:\\x\\patch.h5`` -> ``patch.h5``)."""
    return filename.replace("\\", "/").rsplit("/", 1)[-1].strip()
