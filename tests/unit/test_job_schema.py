"""A task stores its admitted job under a versioned schema (issue 28).

A worker restores its own schema and the ones before it; anything else (a newer node's job, or a
task with no stored job) fails as ``task_unreadable`` before any upstream call, instead of running
as something it did not ask.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from app.core.errors import GatewayError
from app.domain.catalog import Catalog, ModelCapabilities
from app.domain.jobs import ImageJob
from app.tasks.inputs import JOB_SCHEMA, TaskInputs, job_spec
from tests.conftest import MODELS_FILE

SUNSET = dt.datetime(2027, 3, 1, 12, 0, tzinfo=dt.UTC)


class _Images:
    def __init__(self, catalog: Catalog) -> None:
        self._catalog = catalog

    def resolve_model(self, model: str, caller: object) -> ModelCapabilities:
        caps = self._catalog.get(model)
        assert caps is not None
        return caps


class _Store:
    def __init__(self, root: Path) -> None:
        self.root = root

    async def fetch(self, task_id: str, names: list[str]) -> Path:
        return self.root


def inputs(tmp_path: Path) -> TaskInputs:
    catalog = Catalog.from_file(MODELS_FILE)
    return TaskInputs(store=_Store(tmp_path), images=_Images(catalog), limits=None)  # type: ignore[arg-type]


def task(job: Any) -> Any:
    return SimpleNamespace(id="task_1", spec={"job": job, "files": []})


def a_job() -> ImageJob:
    caps = Catalog.from_file(MODELS_FILE).get("gpt-image-1")
    assert caps is not None
    return ImageJob(
        request_id="req_1",
        endpoint="generations",
        model="gpt-image-1",
        caps=caps,
        prompt="a kite",
        n=2,
        size="1024x1024",
        quality="low",
        background=None,
        output_format="png",
        output_compression=None,
        moderation="auto",
        stream=False,
        partial_images=0,
        response_format="b64_json",
        forward={"prompt": "a kite", "n": 2},
        sunset_at=SUNSET,
    )


async def test_a_stored_job_comes_back_the_same_through_json(tmp_path: Path) -> None:
    job = a_job()
    stored = json.loads(json.dumps(job_spec(job)))
    assert stored["schema"] == JOB_SCHEMA
    assert await inputs(tmp_path).restore(task(stored), caller=None) == job  # type: ignore[arg-type]


async def test_a_schema_1_job_is_upgraded(tmp_path: Path) -> None:
    stored = json.loads(json.dumps(job_spec(a_job())))
    del stored["schema"], stored["sunset_at"], stored["deprecated_at"]
    stored["headers"] = {"Sunset": "Mon, 01 Mar 2027 12:00:00 GMT"}  # as 0.2.0 stored it
    restored = await inputs(tmp_path).restore(task(stored), caller=None)  # type: ignore[arg-type]
    assert restored.prompt == "a kite" and restored.n == 2 and restored.sunset_at is None


@pytest.mark.parametrize(
    "stored",
    [
        None,  # queued with its raw payload only, before jobs were stored
        {"schema": JOB_SCHEMA + 1, "model": "gpt-image-1"},  # from a newer node
        {"schema": "2", "model": "gpt-image-1"},
    ],
)
async def test_a_job_this_version_cannot_read_fails_as_unreadable(tmp_path: Path, stored: Any) -> None:
    with pytest.raises(GatewayError) as refused:
        await inputs(tmp_path).restore(task(stored), caller=None)  # type: ignore[arg-type]
    assert refused.value.code == "task_unreadable"
    assert "not charged" in refused.value.message
