"""Edit lines: the images an edit line names by file id, spooled for the one admission path.

An edit line's body is JSON, as OpenAI's JSON image edits take it: ``images`` is a list of
``{"file_id": "file-…"}`` and ``mask`` an optional ``{"file_id": …}``, naming images uploaded to
this gateway by the same key (``purpose=vision`` or ``user_data``). ``image_url`` is refused: the
gateway never fetches a URL a client typed. The named files are copied from the store into a
fresh spool folder and handed over as the multipart form an edit request would have produced, so
the edit is validated (types, sizes, mask), moderated and reserved exactly like ``POST
/v1/images/edits``; the task then moves them into its own folder.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from pathlib import Path
from typing import Any

from app.batches.files import FileService
from app.core.errors import InvalidRequestError
from app.images.intake.spool import SPOOL_PREFIX, SpooledFile, UploadForm

_NO_URLS = (
    "This gateway does not fetch image URLs: upload the image with purpose 'vision' and name it "
    'as {"file_id": "file-…"}.'
)


def _file_id(item: Any, param: str) -> str:
    if isinstance(item, dict) and "image_url" in item:
        raise InvalidRequestError(_NO_URLS, param=param, code="invalid_value")
    if not isinstance(item, dict) or not isinstance(item.get("file_id"), str):
        raise InvalidRequestError(
            f'{param} must be {{"file_id": "file-…"}} naming an image uploaded to this gateway.',
            param=param,
            code="invalid_value",
        )
    return str(item["file_id"])


def _field(value: Any) -> str | None:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | int | float):
        return str(value)
    return None


async def spool_edit(
    body: dict[str, Any], *, key_id: str, files: FileService, spool_root: Path
) -> UploadForm:
    """The form an edit request with these fields and files would have made (the caller cleans it up)."""
    images = body.get("images")
    if images is None and "image" in body:
        images = body["image"] if isinstance(body["image"], list) else [body["image"]]
    if not isinstance(images, list) or not images:
        raise InvalidRequestError(
            "An edit line needs 'images': a list of {\"file_id\": …}.",
            param="images",
            code="missing_required_parameter",
        )
    named = [("image[]", _file_id(item, f"images[{i}]")) for i, item in enumerate(images)]
    if body.get("mask") is not None:
        named.append(("mask", _file_id(body["mask"], "mask")))
    fields: dict[str, list[str]] = {}
    for name, value in body.items():
        if name in ("images", "image", "mask"):
            continue
        text = _field(value)
        if text is None:
            raise InvalidRequestError(
                f"'{name}' must be a string, number or boolean.", param=name, code="invalid_value"
            )
        fields[name] = [text]
    await asyncio.to_thread(spool_root.mkdir, parents=True, exist_ok=True)
    spool_dir = Path(await asyncio.to_thread(tempfile.mkdtemp, prefix=SPOOL_PREFIX, dir=spool_root))
    form = UploadForm(fields=fields, files=[], spool_dir=spool_dir)
    try:
        for index, (field, file_id) in enumerate(named):
            row = await files.get(file_id, key_id)
            path = spool_dir / f"{index:03d}-{'mask' if field == 'mask' else 'image'}"
            handle = await asyncio.to_thread(path.open, "wb")
            try:
                async for chunk in files.content(row):
                    await asyncio.to_thread(handle.write, chunk)
            finally:
                await asyncio.to_thread(handle.close)
            form.files.append(
                SpooledFile(field=field, filename=row.filename, content_type=None, path=path, size=row.bytes)
            )
        return form
    except BaseException:
        await asyncio.to_thread(shutil.rmtree, spool_dir, True)
        raise
