"""The validation step of admission: a client's draft becomes an ``ImageJob``, or 400/403/404.

A generation's JSON, an edit's or a variation's spooled form are checked against the catalog
(``validation.py``, ``output_rules.py``) and the model's lifecycle (``lifecycle.py``: retired models,
remaps, Sunset headers), and an edit's files are read from their headers (``intake/inspector.py``).
Nothing here reserves, moderates or calls an upstream: ``ImageService.admit`` does that next.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

from app.auth.keys import Caller
from app.core.errors import (
    GatewayError,
    InvalidRequestError,
    ModelNotAllowedError,
    ModelNotFoundError,
    ModelRetiredError,
)
from app.domain.catalog import Catalog, ModelCapabilities
from app.domain.jobs import ImageJob, InputImage
from app.images.admission.lifecycle import Lifecycle, Resolution
from app.images.admission.requests import Draft, GenerationDraft, InputLimits, VariationDraft
from app.images.admission.validation import (
    build_job,
    build_variation_job,
    parse_edit_form,
    parse_generate_request,
)
from app.images.intake.inspector import ImageInfo, inspect_edit_inputs
from app.images.intake.spool import SpooledFile, UploadForm
from app.schemas.images import ImageEditForm
from app.upstream.registry import ProviderRegistry


class JobPreparer:
    """Validates drafts into jobs for the models this gateway's upstreams serve."""

    def __init__(self, catalog: Catalog, registry: ProviderRegistry, lifecycle: Lifecycle) -> None:
        self._catalog = catalog
        self._registry = registry
        self.lifecycle = lifecycle

    def models_for(self, caller: Caller) -> list[str]:
        """Models this key may use that some upstream serves, in catalog order."""
        return [m for m in self._registry.models() if caller.may_use(m)]

    def resolve_model(self, model: str, caller: Caller) -> ModelCapabilities:
        caps = self._catalog.get(model)
        if caps is None or model not in self._registry.models():
            raise ModelNotFoundError(model, self.models_for(caller))
        if not caller.may_use(model):
            raise ModelNotAllowedError(model)
        return caps

    def resolve(self, model: str, caller: Caller) -> Resolution:
        """The model a request is served as, after its lifecycle (404 for a retired model that
        nothing serves: raised here, before anything is reserved)."""
        return self.lifecycle.resolve(self.resolve_model(model, caller))

    def _apply(self, job: ImageJob, resolution: Resolution) -> ImageJob:
        if resolution == Resolution(caps=resolution.caps):
            return job  # an active model, served as itself
        return replace(
            job,
            sunset_at=resolution.sunset_at,
            deprecated_at=resolution.deprecated_at,
            retired=resolution.retired,
            requested_model=resolution.requested,
        )

    def _default_format(self, resolution: Resolution) -> str | None:
        """A remapped request keeps the response_format default of the model the client asked for."""
        requested = self._catalog.get(resolution.requested) if resolution.requested else None
        return requested.default_response_format if requested is not None else None

    def prepare_generation(
        self, *, caller: Caller, payload: Any, request_id: str, query_response_format: str | None = None
    ) -> ImageJob:
        """Validate a generation request into a job (400/403 on any rule)."""
        request = parse_generate_request(payload)
        resolution = self.resolve(request.model, caller)
        with _lifecycle_headers(resolution):
            job = build_job(
                request=request,
                caps=resolution.caps,
                request_id=request_id,
                query_response_format=query_response_format,
                default_response_format=self._default_format(resolution),
            )
            self._check_response_format(job)
        return self._apply(job, resolution)

    def _check_response_format(self, job: ImageJob) -> None:
        if job.stream and job.response_format == "url":
            raise InvalidRequestError(
                "response_format 'url' is not supported with stream=true: streamed images are base64.",
                param="response_format",
                code="invalid_value",
            )

    async def prepare_edit(
        self,
        *,
        caller: Caller,
        form: UploadForm,
        request_id: str,
        limits: InputLimits,
        query_response_format: str | None = None,
    ) -> ImageJob:
        """Validate an edit: its fields like a generation's, then the spooled files (type, size,
        mask) read from their bytes, off the event loop."""
        request = parse_edit_form({name: values[-1] for name, values in form.fields.items()})
        resolution = self.resolve(request.model, caller)
        with _lifecycle_headers(resolution):
            return await self._prepare_edit(
                request, resolution, form, request_id, limits, query_response_format
            )

    async def _prepare_edit(
        self,
        request: ImageEditForm,
        resolution: Resolution,
        form: UploadForm,
        request_id: str,
        limits: InputLimits,
        query_response_format: str | None,
    ) -> ImageJob:
        caps = resolution.caps
        uploads, mask, markup = form.images(), form.mask(), form.markup()
        job = build_job(
            request=request,
            caps=caps,
            request_id=request_id,
            endpoint="edits",
            query_response_format=query_response_format,
            has_mask=mask is not None,
            has_markup=markup is not None,
            default_response_format=self._default_format(resolution),
        )
        job = self._apply(job, resolution)
        self._check_response_format(job)
        assert caps.edit is not None  # build_job refuses models without edits
        inputs = await asyncio.to_thread(
            inspect_edit_inputs,
            [upload.path for upload in uploads],
            mask.path if mask is not None else None,
            caps=caps.edit,
            markup=markup.path if markup is not None else None,
            max_pixels=limits.max_pixels,
            max_edge=limits.max_edge,
        )
        images = tuple(_input(upload, info) for upload, info in zip(uploads, inputs.images, strict=True))
        mask_input = _input(mask, inputs.mask) if mask is not None and inputs.mask is not None else None
        markup_input = (
            _input(markup, inputs.markup) if markup is not None and inputs.markup is not None else None
        )
        return replace(job, images=images, mask=mask_input, markup=markup_input)

    async def prepare_variation(
        self,
        *,
        caller: Caller,
        form: UploadForm,
        request_id: str,
        limits: InputLimits,
        query_response_format: str | None = None,
    ) -> ImageJob:
        """``POST /v1/images/variations``: dall-e-2 only, served where an upstream still serves
        it; otherwise OpenAI's 404 naming the retirement (before anything is reserved)."""
        fields = {name: values[-1] for name, values in form.fields.items()}
        model = fields.get("model") or "dall-e-2"
        caps = self._catalog.get(model)
        if caps is None or caps.family != "dall-e-2":
            raise InvalidRequestError(
                f"Image variations are only available for dall-e-2, not '{model}'. "
                "Use /v1/images/edits with a GPT image model and a prompt instead.",
                param="model",
                code="invalid_value",
            )
        try:
            resolution = self.resolve(model, caller)
        except ModelNotFoundError:
            if self.lifecycle.state(caps) != "retired":
                raise
            raise ModelRetiredError(_variations_gone(caps)) from None
        except ModelRetiredError:
            raise ModelRetiredError(_variations_gone(caps)) from None
        if resolution.requested is not None:  # its replacement has no variations endpoint
            raise ModelRetiredError(_variations_gone(caps))
        with _lifecycle_headers(resolution):
            job = build_variation_job(
                fields=fields, caps=caps, request_id=request_id, query_response_format=query_response_format
            )
            assert caps.edit is not None  # dall-e-2 takes one square png
            uploads = form.images()
            inputs = await asyncio.to_thread(
                inspect_edit_inputs,
                [upload.path for upload in uploads],
                None,
                caps=caps.edit,
                max_pixels=limits.max_pixels,
                max_edge=limits.max_edge,
            )
        images = tuple(_input(upload, info) for upload, info in zip(uploads, inputs.images, strict=True))
        return self._apply(replace(job, images=images), resolution)

    async def validate(self, *, caller: Caller, draft: Draft) -> ImageJob:
        """The validation step of admission: a draft becomes a job, or 400/403."""
        if isinstance(draft, GenerationDraft):
            return self.prepare_generation(
                caller=caller,
                payload=draft.payload,
                request_id=draft.request_id,
                query_response_format=draft.query_response_format,
            )
        prepare = self.prepare_variation if isinstance(draft, VariationDraft) else self.prepare_edit
        return await prepare(
            caller=caller,
            form=draft.form,
            request_id=draft.request_id,
            limits=draft.limits,
            query_response_format=draft.query_response_format,
        )


def _input(upload: SpooledFile, info: ImageInfo) -> InputImage:
    return InputImage(
        path=upload.path,
        filename=upload.filename,
        format=info.format,
        width=info.width,
        height=info.height,
        has_alpha=info.has_alpha,
        size=info.size,
    )


def _variations_gone(caps: ModelCapabilities) -> str:
    return (
        f"{caps.retirement_message()} Image variations were retired with it: send the image to "
        "/v1/images/edits with a GPT image model and a prompt instead."
    )


@contextmanager
def _lifecycle_headers(resolution: Resolution) -> Iterator[None]:
    """A refused request for a model being retired still says so (Sunset, Deprecation)."""
    try:
        yield
    except GatewayError as exc:
        exc.headers = {**resolution.headers, **exc.headers}
        raise
