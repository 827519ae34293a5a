"""The multipart body of an edit, built from the spooled files for one upstream attempt.

Files are handed to httpx as open file objects, which it reads in 64 KiB chunks while sending,
so memory stays flat whatever the upload size; each attempt (a retry, a failover) reopens them
from the spool, which is what makes edits replayable.
"""

from __future__ import annotations

from contextlib import ExitStack
from typing import IO, Any

from app.images.jobs import ImageJob, InputImage

FileField = tuple[str, tuple[str, IO[bytes], str]]


def form_value(value: Any) -> str:
    """A JSON-typed field as multipart text, the way the OpenAI SDKs send it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def edit_parts(
    job: ImageJob, upstream_model: str, files: ExitStack, *, stream: bool
) -> tuple[dict[str, str], list[FileField]]:
    """Form fields and file fields; the files are closed when ``files`` is."""
    body = job.upstream_body(upstream_model)
    body.pop("response_format", None)  # edits never ask for URLs upstream; see ImageJob.upstream_body
    if job.caps.family != "gpt-image":
        body["response_format"] = "b64_json"
    if stream:
        body["stream"] = True
    data = {name: form_value(value) for name, value in body.items() if not isinstance(value, dict | list)}
    # One image goes as `image`; several as repeated `image[]`, the array form the API expects.
    name = "image" if len(job.images) == 1 else "image[]"
    parts: list[FileField] = [(name, _file(image, index, files)) for index, image in enumerate(job.images)]
    if job.mask is not None:
        parts.append(("mask", _file(job.mask, 0, files, stem="mask")))
    return data, parts


def _file(image: InputImage, index: int, files: ExitStack, stem: str = "image") -> tuple[str, IO[bytes], str]:
    extension = "jpg" if image.format == "jpeg" else image.format
    # The client's own filename is not forwarded: it may carry paths or personal data.
    handle = files.enter_context(image.path.open("rb"))
    return f"{stem}-{index}.{extension}", handle, image.content_type
