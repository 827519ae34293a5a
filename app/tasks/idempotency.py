"""Idempotency keys of async submissions: what a key is bound to, and which are being submitted.

A key is bound to the request it was first used with, by a SHA-256 fingerprint stored with the
task: the same request again gets the first task, another request with the same key a 422
``idempotency_key_reused`` (the IETF Idempotency-Key draft; Stripe does the same), and a repeat
while the first is still being submitted a 409. The fingerprint covers what decides the work: the
JSON body (keys sorted, so the SDK's field order does not matter), or an edit's fields and the
bytes of its files, plus the query parameters that change the answer.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import orjson

from app.core.errors import IdempotencyConflictError, IdempotencyKeyReusedError
from app.images.admission.requests import Draft, GenerationDraft

_CHUNK = 1 << 20


def fingerprint(draft: Draft, webhooks: Sequence[str] | None) -> str:
    """The request's fingerprint (reads an edit's spooled files: call it off the event loop)."""
    digest = hashlib.sha256()
    digest.update(type(draft).__name__.encode())
    digest.update(orjson.dumps([draft.query_response_format, None if webhooks is None else sorted(webhooks)]))
    if isinstance(draft, GenerationDraft):
        digest.update(orjson.dumps(draft.payload, option=orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS))
        return digest.hexdigest()
    form = draft.form
    digest.update(orjson.dumps({name: values for name, values in sorted(form.fields.items())}))
    for part in form.files:
        digest.update(orjson.dumps([part.field, part.filename, part.content_type, part.size]))
        digest.update(_file_digest(part.path))
    return digest.hexdigest()


def _file_digest(path: Path) -> bytes:
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").digest()


def reused_error() -> IdempotencyKeyReusedError:
    return IdempotencyKeyReusedError(
        "This Idempotency-Key was already used with a different request. Use a new key for a new request.",
        param="Idempotency-Key",
    )


class InFlight:
    """The idempotency keys this process is submitting now (between the check and the commit).

    Only a courtesy answer rests on it (409 rather than waiting): that one key yields one task, on
    any number of nodes, is the unique index on ``(key_id, idempotency_key)``.
    """

    def __init__(self) -> None:
        self._now: dict[tuple[str, str], str] = {}

    @contextmanager
    def hold(self, key_id: str, idempotency_key: str, print_: str) -> Iterator[None]:
        slot = (key_id, idempotency_key)
        current = self._now.get(slot)
        if current is not None:
            if current != print_:
                raise reused_error()
            raise IdempotencyConflictError(
                "A request with this Idempotency-Key is still being processed. Retry shortly.",
                param="Idempotency-Key",
                headers={"retry-after": "1"},
            )
        self._now[slot] = print_
        try:
            yield
        finally:
            del self._now[slot]
