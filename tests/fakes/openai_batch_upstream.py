"""A fake OpenAI Files + Batches API on 127.0.0.1, speaking the documented wire format:
``POST /v1/files`` (multipart: ``purpose``, ``file``) → FileObject; ``GET /v1/files/{id}/content``;
``POST /v1/batches`` → Batch; ``GET /v1/batches/{id}``; ``GET /v1/batches`` (list, ``limit``);
``POST /v1/batches/{id}/cancel``. Output and error files are JSONL of ``{"id", "custom_id",
"response": {"status_code", "request_id", "body"}, "error"}``, as the batch guide shows.

The test drives each batch through its states, without sleeps:

- ``hold`` (an Event, clear by default): while set, every retrieve answers ``in_progress`` (the
  slow batch); once clear, the next retrieve finishes it. ``polled(n)`` waits until batches were
  retrieved ``n`` times in all.
- Per line, by its prompt: ``[fail]`` answers HTTP 400 with an OpenAI error body in the error
  file (a partial failure), ``[error]`` has no response but an ``error`` object (the request could
  not be run); any other line succeeds with ``n`` tiny PNGs and a ``usage`` the test can read back
  (``usage_for``).
- ``expire_after`` (an int or None): the batch ends ``expired`` with only its first that many lines
  done; the others are in the error file with ``batch_expired``, as OpenAI's are.
- ``Outcome("status", path=...)`` from ``ProviderFake`` injects an HTTP error on a path;
  ``lose_answer`` (method and path → count) does the work and then answers 502, as when the
  connection drops after the upstream acted: the client cannot know whether it did.
"""

from __future__ import annotations

import base64
import itertools
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import orjson
from starlette.responses import Response

from tests.fakes.images import render_image
from tests.fakes.provider_fake import Outcome, ProviderFake, Recorded, json_answer

ENDPOINTS = ("/v1/images/generations", "/v1/images/edits")


@dataclass
class FakeBatch:
    id: str
    input_file_id: str
    endpoint: str
    metadata: dict[str, str] | None
    created_at: int
    status: str = "in_progress"
    output_file_id: str | None = None
    error_file_id: str | None = None
    counts: dict[str, int] = field(default_factory=lambda: {"total": 0, "completed": 0, "failed": 0})

    def view(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "batch",
            "endpoint": self.endpoint,
            "errors": None,
            "input_file_id": self.input_file_id,
            "completion_window": "24h",
            "status": self.status,
            "output_file_id": self.output_file_id,
            "error_file_id": self.error_file_id,
            "created_at": self.created_at,
            "in_progress_at": self.created_at,
            "expires_at": self.created_at + 86400,
            "request_counts": dict(self.counts),
            "metadata": self.metadata,
        }


class FakeOpenAIBatch(ProviderFake):
    name = "fake-openai-batch"

    def __init__(self, api_key: str) -> None:
        super().__init__(api_key)
        self._ids = itertools.count(1)
        self.files: dict[str, bytes] = {}
        self.names: dict[str, str] = {}  # uploaded file id → its filename
        self.batches: dict[str, FakeBatch] = {}
        self.hold = threading.Event()
        self.expire_after: int | None = None
        self.lose_answer: dict[tuple[str, str], int] = {}
        self._usage: dict[str, dict[str, Any]] = {}
        self._polls = 0
        self._polled = threading.Condition()

    def reset(self) -> None:
        self.files.clear()
        self.names.clear()
        self.batches.clear()
        self.hold.clear()
        self.expire_after = None
        self.lose_answer.clear()
        self._usage.clear()
        with self._polled:
            self._polls = 0

    def authorized(self, recorded: Recorded) -> bool:
        return recorded.headers.get("authorization") == f"Bearer {self.api_key}"

    def unauthorized(self) -> Response:
        error = {
            "message": "Incorrect API key provided.",
            "type": "invalid_request_error",
            "code": "invalid_api_key",
        }
        return json_answer({"error": error}, 401)

    # -- what the test reads ------------------------------------------------------------------------

    @property
    def uploads(self) -> list[Recorded]:
        return [r for r in self.requests if r.method == "POST" and r.path == "/v1/files"]

    @property
    def creates(self) -> list[Recorded]:
        return [r for r in self.requests if r.method == "POST" and r.path == "/v1/batches"]

    def input_lines(self, file_id: str) -> list[dict[str, Any]]:
        return [orjson.loads(line) for line in self.files[file_id].splitlines() if line.strip()]

    def usage_for(self, custom_id: str) -> dict[str, Any]:
        """The usage the fake reported for the upstream line ``custom_id``."""
        return self._usage[custom_id]

    @property
    def polls(self) -> int:
        with self._polled:
            return self._polls

    def polled(self, n: int, timeout: float = 60.0) -> bool:
        """Wait until batches have been retrieved ``n`` times in all."""
        with self._polled:
            return self._polled.wait_for(lambda: self._polls >= n, timeout)

    # -- the API ------------------------------------------------------------------------------------

    async def answer(self, recorded: Recorded, outcome: Outcome | None) -> Response:
        response = self._answer(recorded)
        lost = (recorded.method, recorded.path)
        if self.lose_answer.get(lost, 0) > 0:
            self.lose_answer[lost] -= 1
            return _error(502, "Bad gateway.", "server_error")
        return response

    def _answer(self, recorded: Recorded) -> Response:
        path, method = recorded.path, recorded.method
        if method == "POST" and path == "/v1/files":
            return self._upload(recorded)
        if method == "GET" and path == "/v1/files":
            purpose = recorded.query.get("purpose")
            listed = [f for f in reversed(self.names.items()) if purpose in (None, "batch")]
            limit = int(recorded.query.get("limit", "10000"))
            data = [{"id": i, "object": "file", "filename": n, "purpose": "batch"} for i, n in listed[:limit]]
            return json_answer({"object": "list", "data": data, "has_more": len(listed) > limit})
        if method == "GET" and path.startswith("/v1/files/") and path.endswith("/content"):
            content = self.files.get(path.split("/")[3])
            if content is None:
                return _error(404, "No such File object.", "invalid_request_error")
            return Response(content, 200, media_type="application/octet-stream")
        if method == "POST" and path == "/v1/batches":
            return self._create(recorded)
        if method == "GET" and path == "/v1/batches":
            limit = int(recorded.query.get("limit", "20"))
            newest = sorted(self.batches.values(), key=lambda b: (b.created_at, b.id), reverse=True)
            data = [b.view() for b in newest[:limit]]
            return json_answer({"object": "list", "data": data, "has_more": len(newest) > limit})
        parts = path.split("/")
        if len(parts) >= 4 and parts[2] == "batches":
            batch = self.batches.get(parts[3])
            if batch is None:
                return _error(404, f"No batch found with id '{parts[3]}'.", "invalid_request_error")
            if method == "POST" and parts[-1] == "cancel":
                if batch.status == "in_progress":
                    batch.status = "cancelling"
                return json_answer(batch.view())
            if method == "GET":
                self._advance(batch)
                with self._polled:
                    self._polls += 1
                    self._polled.notify_all()
                return json_answer(batch.view())
        return _error(404, "Not found.", "invalid_request_error")

    def _upload(self, recorded: Recorded) -> Response:
        if recorded.form.get("purpose") != ["batch"]:
            return _error(400, "purpose must be batch.", "invalid_request_error")
        sent = recorded.files.get("file")
        if not sent:
            return _error(400, "Missing required parameter: 'file'.", "invalid_request_error")
        file_id = f"file-up{next(self._ids)}"
        self.files[file_id] = sent[0][0]
        # The part's filename, from its Content-Disposition (the recorder keeps only the bytes).
        named = re.search(rb'name="file"; filename="([^"]*)"', recorded.body)
        self.names[file_id] = named.group(1).decode() if named else "upload.jsonl"
        created = int(time.time())
        return json_answer(
            {
                "id": file_id,
                "object": "file",
                "bytes": len(sent[0][0]),
                "created_at": created,
                "filename": self.names[file_id],
                "purpose": "batch",
                "status": "processed",
            }
        )

    def _create(self, recorded: Recorded) -> Response:
        body = recorded.json or {}
        file_id = body.get("input_file_id")
        if file_id not in self.files:
            return _error(400, "The input file does not exist.", "invalid_request_error")
        if body.get("endpoint") not in ENDPOINTS or body.get("completion_window") != "24h":
            return _error(400, "Invalid endpoint or completion_window.", "invalid_request_error")
        for line in self.input_lines(file_id):
            if line.get("url") != body["endpoint"] or line.get("method") != "POST":
                return _error(400, "A line's url does not match the endpoint.", "invalid_request_error")
        batch = FakeBatch(
            id=f"batch_up{next(self._ids)}",
            input_file_id=file_id,
            endpoint=body["endpoint"],
            metadata=body.get("metadata"),
            created_at=int(time.time()),
        )
        batch.counts["total"] = len(self.input_lines(file_id))
        self.batches[batch.id] = batch
        return json_answer(batch.view())

    def _advance(self, batch: FakeBatch) -> None:
        """Finish the batch on this retrieve unless the test holds it."""
        if batch.status in ("completed", "expired", "cancelled", "failed"):
            return
        if batch.status == "in_progress" and self.hold.is_set():
            return
        outputs: list[bytes] = []
        errors: list[bytes] = []
        for index, line in enumerate(self.input_lines(batch.input_file_id)):
            custom_id = line["custom_id"]
            request_id = f"req_{batch.id}_{index}"
            if batch.status == "cancelling" or (self.expire_after is not None and index >= self.expire_after):
                code = "batch_cancelled" if batch.status == "cancelling" else "batch_expired"
                message = "This request could not be executed before the completion window expired."
                errors.append(_line(custom_id, None, {"code": code, "message": message}))
                continue
            prompt = str(line["body"].get("prompt", ""))
            if "[fail]" in prompt:
                body = {
                    "error": {
                        "message": "Your request was rejected by the safety system.",
                        "type": "invalid_request_error",
                        "param": None,
                        "code": "moderation_blocked",
                    }
                }
                errors.append(
                    _line(custom_id, {"status_code": 400, "request_id": request_id, "body": body}, None)
                )
                continue
            if "[error]" in prompt:
                errors.append(
                    _line(custom_id, None, {"code": "server_error", "message": "The request failed."})
                )
                continue
            n = int(line["body"].get("n", 1))
            usage = {
                "input_tokens": 10 + index,
                "input_tokens_details": {"text_tokens": 10 + index, "image_tokens": 0},
                "output_tokens": 1000 * n + index,
                "total_tokens": 10 + index + 1000 * n + index,
            }
            self._usage[custom_id] = usage
            image = base64.b64encode(render_image(16, 16, "png")).decode()
            answer = {
                "created": int(time.time()),
                "data": [{"b64_json": image} for _ in range(n)],
                "usage": usage,
            }
            outputs.append(
                _line(custom_id, {"status_code": 200, "request_id": request_id, "body": answer}, None)
            )
        if outputs:
            batch.output_file_id = f"file-out{next(self._ids)}"
            self.files[batch.output_file_id] = b"".join(outputs)
        if errors:
            batch.error_file_id = f"file-err{next(self._ids)}"
            self.files[batch.error_file_id] = b"".join(errors)
        batch.counts["completed"] = len(outputs)
        batch.counts["failed"] = len(errors)
        if batch.status == "cancelling":
            batch.status = "cancelled"
        elif self.expire_after is not None:
            batch.status = "expired"
        else:
            batch.status = "completed"


def _line(custom_id: str, response: dict[str, Any] | None, error: dict[str, Any] | None) -> bytes:
    item = {"id": f"batch_req_{custom_id}", "custom_id": custom_id, "response": response, "error": error}
    return orjson.dumps(item) + b"\n"


def _error(status: int, message: str, kind: str) -> Response:
    return json_answer({"error": {"message": message, "type": kind, "param": None, "code": None}}, status)
