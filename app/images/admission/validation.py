"""Check a request against its model's capabilities and turn it into an ``ImageJob``.

Messages and codes follow what the OpenAI API answers for the same mistake, so clients that
handle OpenAI errors handle ours. The first failing rule wins, in the order of the SPEC's table.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any, cast

from pydantic import ValidationError

from app.core.errors import InvalidJSONError, InvalidRequestError
from app.domain.catalog import RESPONSE_FORMATS, ModelCapabilities, parse_size
from app.domain.jobs import Endpoint, ImageJob, ResponseFormat
from app.domain.provider_spec import unmapped_fields
from app.images.admission.output_rules import check_complexity, check_output_options
from app.schemas.images import ImageEditForm, ImageGenerateRequest

MODERATION_LEVELS = ("low", "auto")
BACKGROUNDS = ("transparent", "opaque", "auto")
N_MAX = 10
PARTIAL_IMAGES_MAX = 3


def parse_generate_request(payload: Any) -> ImageGenerateRequest:
    """Type-check a decoded JSON body; the first problem becomes an OpenAI-shaped 400."""
    if not isinstance(payload, dict):
        raise InvalidJSONError("expected a JSON object")
    try:
        return ImageGenerateRequest.model_validate(payload)
    except ValidationError as exc:
        raise _from_pydantic(exc) from None


def parse_edit_form(fields: Mapping[str, str]) -> ImageEditForm:
    """Type-check multipart text fields (numbers and booleans arrive as strings); bracketed names
    (``svg[model]``, ``svg[reasoning][effort]``) become nested objects, as the SDKs encode them."""
    try:
        return ImageEditForm.model_validate(nest_fields(fields))
    except ValidationError as exc:
        raise _from_pydantic(exc) from None


def nest_fields(fields: Mapping[str, str]) -> dict[str, Any]:
    """``{"svg[reasoning][effort]": "low"}`` → ``{"svg": {"reasoning": {"effort": "low"}}}``.

    The inverse of how the OpenAI SDKs flatten objects into multipart fields; the multipart
    builder for upstreams flattens them back the same way. A name that is not a clean
    ``a[b][c]`` path, or that clashes with a plain field of the same name, stays as it came.
    """
    nested: dict[str, Any] = {}
    for name, value in fields.items():
        path = _bracket_path(name)
        if path is None:
            nested[name] = value
            continue
        node = nested
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                node = {}
                break
            node = child
        else:
            node[path[-1]] = value
            continue
        nested[name] = value
    return nested


def _bracket_path(name: str) -> list[str] | None:
    head, sep, rest = name.partition("[")
    if not sep or not head or not rest.endswith("]"):
        return None
    parts = rest[:-1].split("][")
    if any(not part or "[" in part or "]" in part for part in parts):
        return None
    return [head, *parts]


def _from_pydantic(exc: ValidationError) -> InvalidRequestError:
    error = exc.errors()[0]
    param = ".".join(str(part) for part in error["loc"]) or None
    if error["type"] == "missing":
        return InvalidRequestError(
            f"Missing required parameter: '{param}'.", param=param, code="missing_required_parameter"
        )
    expected = {
        "int_type": "an integer",
        "int_parsing": "an integer",
        "bool_type": "a boolean",
        "bool_parsing": "a boolean",
        "string_type": "a string",
    }.get(error["type"], "a valid value")
    return InvalidRequestError(
        f"Invalid type for '{param}': expected {expected}, but got {_json_type(error.get('input'))}.",
        param=param,
        code="invalid_type",
    )


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def _choices(values: tuple[str, ...] | list[str]) -> str:
    quoted = [f"'{v}'" for v in values]
    if len(quoted) <= 2:
        return " and ".join(quoted)
    return ", ".join(quoted[:-1]) + ", and " + quoted[-1]


def _invalid_choice(param: str, value: object, allowed: tuple[str, ...] | list[str]) -> InvalidRequestError:
    return InvalidRequestError(
        f"Invalid value: '{value}'. Supported values are: {_choices(allowed)}.",
        param=param,
        code="invalid_value",
    )


def _bounded(param: str, value: int, low: int, high: int) -> None:
    if value < low:
        raise InvalidRequestError(
            f"Invalid '{param}': integer below minimum value. Expected a value >= {low}, "
            f"but got {value} instead.",
            param=param,
            code="integer_below_min_value",
        )
    if value > high:
        raise InvalidRequestError(
            f"Invalid '{param}': integer above maximum value. Expected a value <= {high}, "
            f"but got {value} instead.",
            param=param,
            code="integer_above_max_value",
        )


def check_prompt(prompt: str, caps: ModelCapabilities) -> None:
    if not prompt.strip():
        raise InvalidRequestError(
            "Invalid 'prompt': empty string. Expected a string with minimum length 1, "
            "but got an empty string instead.",
            param="prompt",
            code="empty_string",
        )
    if len(prompt) > caps.max_prompt_chars:
        raise InvalidRequestError(
            f"Invalid 'prompt': string too long. Expected a string with maximum length "
            f"{caps.max_prompt_chars}, but got a string with length {len(prompt)} instead.",
            param="prompt",
            code="string_above_max_length",
        )


def check_unsupported(fields: Mapping[str, Any], caps: ModelCapabilities) -> None:
    """Fields the catalog marks unsupported for this model are a 400 when actually set."""
    for name in sorted(caps.unsupported_fields):
        value = fields.get(name)
        # `false`/`null` mean "off", which every model supports.
        if value is None or value is False:
            continue
        raise InvalidRequestError(
            f"Unsupported parameter: '{name}' is not supported with the model '{caps.name}'.",
            param=name,
            code="unsupported_parameter",
        )


def check_unmapped(fields: Mapping[str, Any], caps: ModelCapabilities) -> None:
    """A provider model (Gemini, FLUX, …) has nowhere to forward a field its adapter does not
    translate: unless its catalog entry maps it (``provider.params``), it is a 400, never silently
    dropped. ``false`` and ``null`` mean "off", which every model supports. A mapped field the
    catalog gives a rule (``ParamRule``) must also hold a value the provider takes: a 400 here,
    before any reservation or call, rather than the provider's own 4xx after one."""
    unmapped = unmapped_fields(
        (k for k, v in fields.items() if v is not None and v is not False), caps.provider
    )
    if unmapped:
        raise InvalidRequestError(
            f"Unsupported parameter: '{unmapped[0]}' is not supported with the model '{caps.name}'.",
            param=unmapped[0],
            code="unsupported_parameter",
        )
    spec = caps.provider
    if spec is None:
        return
    for name in sorted(spec.param_rules):
        value = fields.get(name)
        if value is None:
            continue
        _, reason = spec.parse_param(name, value)
        if reason is not None:
            raise InvalidRequestError(
                f"Invalid '{name}': {reason} for the model '{caps.name}', got {str(value)[:100]!r}.",
                param=name,
                code="invalid_value",
            )


def check_size(size: str, caps: ModelCapabilities) -> None:
    if size in caps.sizes:
        return
    dims = parse_size(size)
    if caps.free_size is not None and dims is not None:
        reason = caps.free_size.check(*dims)
        if reason is None:
            return
        raise InvalidRequestError(f"Invalid size '{size}': {reason}.", param="size", code="invalid_value")
    allowed = list(caps.sizes) + (["any WxH within the model's size rule"] if caps.free_size else [])
    raise _invalid_choice("size", size, allowed)


def resolve_response_format(
    body_value: str | None, query_value: str | None, default: str = "b64_json"
) -> ResponseFormat:
    """The body wins over the query string; the default is the model family's, as OpenAI's:
    ``url`` for dall-e-2/3, base64 for GPT image models."""
    value = body_value if body_value is not None else query_value
    if value is None:
        return cast(ResponseFormat, default)
    if value not in RESPONSE_FORMATS:
        raise _invalid_choice("response_format", value, RESPONSE_FORMATS)
    return cast(ResponseFormat, value)


def check_edit_fields(request: ImageEditForm, fields: Mapping[str, Any], caps: ModelCapabilities) -> None:
    """Rules only edits have: the model must take edits, no ``style``, ``input_fidelity`` per model."""
    if caps.edit is None:
        raise InvalidRequestError(
            f"The model '{caps.name}' does not support image edits.", param="model", code="invalid_value"
        )
    if fields.get("style") is not None:
        raise InvalidRequestError(
            "Unsupported parameter: 'style' is not supported for image edits.",
            param="style",
            code="unsupported_parameter",
        )
    fidelity = request.input_fidelity
    if fidelity is not None and fidelity not in caps.input_fidelity:
        if not caps.input_fidelity:
            raise InvalidRequestError(
                f"Unsupported parameter: 'input_fidelity' is not supported with the model '{caps.name}'.",
                param="input_fidelity",
                code="unsupported_parameter",
            )
        raise _invalid_choice("input_fidelity", fidelity, caps.input_fidelity)


def build_job(
    *,
    request: ImageGenerateRequest | ImageEditForm,
    caps: ModelCapabilities,
    request_id: str,
    endpoint: Endpoint = "generations",
    query_response_format: str | None = None,
    has_mask: bool = False,
    has_markup: bool = False,
    default_response_format: str | None = None,
) -> ImageJob:
    """Apply every catalog rule; returns the job with effective settings or raises a 400.

    ``has_mask``/``has_markup``: whether an edit carries those files (their contents are checked
    later, from the spool); ``default_response_format``: overrides the model's (a remapped model
    keeps the asked one's).
    """
    fields = request.model_dump(exclude_none=True)
    extra = request.model_extra or {}
    fields.update({k: v for k, v in extra.items() if v is not None})

    check_prompt(request.prompt, caps)
    if isinstance(request, ImageEditForm):
        check_edit_fields(request, fields, caps)
        check_markup(caps, has_mask=has_mask, has_markup=has_markup)
    check_unsupported(fields, caps)
    check_unmapped(fields, caps)

    n = request.n if request.n is not None else 1
    _bounded("n", n, 1, N_MAX)
    if n > caps.n_max:
        raise InvalidRequestError(
            f"Invalid 'n': the model '{caps.name}' supports at most n={caps.n_max}.",
            param="n",
            code="invalid_value",
        )

    size = request.size if request.size is not None else caps.default_size
    check_size(size, caps)

    quality = request.quality if request.quality is not None else caps.default_quality
    if quality not in caps.qualities:
        raise _invalid_choice("quality", quality, caps.qualities)

    output_format = request.output_format if request.output_format is not None else caps.output_formats[0]
    if output_format not in caps.output_formats:
        raise _invalid_choice("output_format", output_format, caps.output_formats)

    background = request.background
    if background is not None:
        if background not in BACKGROUNDS:
            raise _invalid_choice("background", background, BACKGROUNDS)
        if background == "transparent":
            if not caps.transparent_background:
                raise InvalidRequestError(
                    f"Transparent backgrounds are not supported by the model '{caps.name}'.",
                    param="background",
                    code="invalid_value",
                )
            if output_format not in ("png", "webp"):
                raise InvalidRequestError(
                    f"Transparent background requires output_format 'png' or 'webp', "
                    f"but got '{output_format}'.",
                    param="background",
                    code="invalid_value",
                )

    compression = request.output_compression
    if compression is not None:
        _bounded("output_compression", compression, 0, 100)
        if output_format == "png" and compression < 100:
            raise InvalidRequestError(
                "Invalid 'output_compression': compression below 100 is only supported with "
                "output_format 'jpeg' or 'webp'.",
                param="output_compression",
                code="invalid_value",
            )

    moderation = request.moderation if request.moderation is not None else "auto"
    if moderation not in MODERATION_LEVELS:
        raise _invalid_choice("moderation", moderation, MODERATION_LEVELS)

    stream = bool(request.stream)
    if stream and not caps.stream:
        raise InvalidRequestError(
            f"Streaming is not supported with the model '{caps.name}'.", param="stream", code="invalid_value"
        )
    partial_images = request.partial_images if request.partial_images is not None else 0
    _bounded("partial_images", partial_images, 0, min(PARTIAL_IMAGES_MAX, caps.max_partial_images))

    check_complexity(request.complexity, caps)
    options = check_output_options(
        caps=caps,
        output_format=output_format,
        n=n,
        size=size,
        stream=stream,
        partial_images=request.partial_images,
        compression=compression,
        frame_count=request.frame_count,
        frame_duration_ms=request.frame_duration_ms,
        svg=fields.get("svg") if request.svg is not None else None,
        has_mask=has_mask,
    )

    response_format = resolve_response_format(
        request.response_format,
        query_response_format,
        default_response_format or caps.default_response_format,
    )

    return ImageJob(
        request_id=request_id,
        endpoint=endpoint,
        model=caps.name,
        caps=caps,
        prompt=request.prompt,
        n=n,
        size=size,
        quality=quality,
        background=background,
        output_format=output_format,
        output_compression=compression,
        moderation=moderation,
        stream=stream,
        partial_images=partial_images,
        response_format=response_format,
        forward=fields,
        input_fidelity=request.input_fidelity if isinstance(request, ImageEditForm) else None,
        complexity=request.complexity,
        frame_count=options.frame_count,
        frame_duration_ms=options.frame_duration_ms,
        svg=options.svg,
    )


def streamed_for_previews(job: ImageJob) -> ImageJob:
    """An asynchronous request's ``partial_images`` take effect without ``stream`` (a contract
    extension, README "Asynchronous requests"): its worker streams from the upstream to keep a
    preview of each image, so the job is a streaming one, and its hold covers the partials the
    upstream may bill. A synchronous request keeps OpenAI's rule (only with ``stream=true``)."""
    if job.partial_images > 0 and not job.stream and job.caps.stream:
        return replace(job, stream=True)
    return job


def build_variation_job(
    *, fields: Mapping[str, str], caps: ModelCapabilities, request_id: str, query_response_format: str | None
) -> ImageJob:
    """``POST /v1/images/variations`` (dall-e-2's legacy endpoint): ``n``, ``size``,
    ``response_format``; no prompt. Everything the client sent is forwarded as it came."""
    n = 1
    raw_n = fields.get("n")
    if raw_n is not None:
        try:
            n = int(raw_n)
        except ValueError:
            raise InvalidRequestError(
                f"Invalid type for 'n': expected an integer, but got {_json_type(raw_n)}.",
                param="n",
                code="invalid_type",
            ) from None
    _bounded("n", n, 1, min(N_MAX, caps.n_max))
    size = fields.get("size") or caps.default_size
    check_size(size, caps)
    response_format = resolve_response_format(
        fields.get("response_format"), query_response_format, caps.default_response_format
    )
    forward = {k: v for k, v in fields.items() if k not in ("prompt",)}
    return ImageJob(
        request_id=request_id,
        endpoint="variations",
        model=caps.name,
        caps=caps,
        prompt="",
        n=n,
        size=size,
        quality=caps.default_quality,
        background=None,
        output_format="png",
        output_compression=None,
        moderation="auto",
        stream=False,
        partial_images=0,
        response_format=response_format,
        forward=forward,
    )


def check_markup(caps: ModelCapabilities, *, has_mask: bool, has_markup: bool) -> None:
    """``markup`` only where the model takes it, and never together with a mask (the SDK)."""
    if not has_markup:
        return
    if caps.edit is None or not caps.edit.markup:
        raise InvalidRequestError(
            f"Unsupported parameter: 'markup' is not supported with the model '{caps.name}'.",
            param="markup",
            code="unsupported_parameter",
        )
    if has_mask:
        raise InvalidRequestError(
            "'markup' cannot be combined with 'mask': send one or the other.",
            param="markup",
            code="invalid_value",
        )
