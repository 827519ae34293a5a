"""Image inspection: real type from the bytes, size and alpha from headers; bad files and bombs refused."""

from __future__ import annotations

import struct
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from app.core.errors import InvalidRequestError, PayloadTooLargeError
from app.domain.catalog import EditCaps
from app.images.intake.inspector import ImageInfo, inspect_edit_inputs, inspect_image
from tests.fakes import image_files as f

GPT_EDIT = EditCaps(
    max_images=16, max_image_bytes=50 * 1024 * 1024, formats=("png", "jpeg", "webp"), mask=True
)
DALLE2_EDIT = EditCaps(
    max_images=1, max_image_bytes=4 * 1024 * 1024, formats=("png",), mask=True, square_only=True
)


@pytest.fixture
def put(tmp_path: Path) -> Callable[..., Path]:
    counter = iter(range(10_000))

    def put(data: bytes, name: str = "upload.png") -> Path:
        path = tmp_path / f"{next(counter)}-{name}"
        path.write_bytes(data)
        return path

    return put


@pytest.fixture
def peak_memory() -> Iterator[Callable[[], int]]:
    tracemalloc.start()
    tracemalloc.reset_peak()
    yield lambda: tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()


def refused(path: Path, **options: object) -> InvalidRequestError:
    with pytest.raises(InvalidRequestError) as caught:
        inspect_image(path, **options)  # type: ignore[arg-type]
    return caught.value


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (f.png(64, 48), ("png", 64, 48, False)),
        (f.png(33, 17, mode="RGBA"), ("png", 33, 17, True)),
        (f.png(20, 10, mode="L"), ("png", 20, 10, False)),
        (f.png(20, 10, mode="LA"), ("png", 20, 10, True)),
        (f.png(20, 10, mode="P"), ("png", 20, 10, False)),
        (f.png(20, 10, mode="1"), ("png", 20, 10, False)),
        (f.palette_png_with_transparency(32, 24), ("png", 32, 24, True)),
        (f.rgb_png_with_trns(16, 8), ("png", 16, 8, True)),
        (f.jpeg(64, 48), ("jpeg", 64, 48, False)),
        (f.jpeg(100, 80, progressive=True), ("jpeg", 100, 80, False)),
        (f.webp(64, 48), ("webp", 64, 48, False)),
        (f.webp(64, 48, alpha=True), ("webp", 64, 48, True)),
        (f.webp(70, 30, lossless=True), ("webp", 70, 30, False)),
        (f.webp(70, 30, alpha=True, lossless=True), ("webp", 70, 30, True)),
    ],
)
def test_format_size_and_alpha_come_from_the_headers(
    put: Callable[..., Path], data: bytes, expected: tuple[str, int, int, bool]
) -> None:
    # Every file is named .png: the name must not matter.
    info = inspect_image(put(data))
    assert (info.format, info.width, info.height, info.has_alpha) == expected
    assert info.size == len(data)


def test_webp_variants_use_each_header_kind() -> None:
    assert f.webp()[12:16] == b"VP8 "
    assert f.webp(alpha=True)[12:16] == b"VP8X"
    assert f.webp(lossless=True)[12:16] == b"VP8L"


@pytest.mark.parametrize(
    ("data", "found"),
    [
        (f.gif(), "GIF"),
        (b"just some text, not an image\n", "not an image"),
        (b"BM" + b"\x00" * 60, "BMP"),
        (b"\x00\x00\x00\x18ftypheic" + b"\x00" * 40, "ISO media"),
    ],
)
def test_the_real_type_is_read_from_the_bytes(put: Callable[..., Path], data: bytes, found: str) -> None:
    error = refused(put(data, "photo.png"))
    assert error.code == "invalid_image_format"
    assert error.param == "image"
    assert found in error.message


def test_a_format_not_allowed_here_is_refused_with_the_param(put: Callable[..., Path]) -> None:
    error = refused(put(f.jpeg(), "mask.png"), param="mask", allowed=("png",))
    assert (error.code, error.param) == ("invalid_image_format", "mask")
    assert "JPEG" in error.message


def test_an_empty_file_is_invalid(put: Callable[..., Path]) -> None:
    error = refused(put(b""))
    assert error.code == "invalid_image"
    assert "empty" in error.message


@pytest.mark.parametrize(
    "make", [lambda: f.png(300, 200), lambda: f.jpeg(300, 200), lambda: f.webp(300, 200)]
)
@pytest.mark.parametrize("keep", [0.05, 0.5, 0.95])
def test_truncated_images_are_invalid(
    put: Callable[..., Path], make: Callable[[], bytes], keep: float
) -> None:
    data = f.truncated(make(), keep)
    error = refused(put(data))
    assert error.code == "invalid_image"


@pytest.mark.parametrize("cut", [1, 2, 3, 12])
def test_png_cut_just_before_its_end_is_invalid(put: Callable[..., Path], cut: int) -> None:
    assert refused(put(f.png()[:-cut])).code == "invalid_image"


def test_a_png_with_a_damaged_chunk_fails_its_checksum(put: Callable[..., Path]) -> None:
    data = bytearray(f.png(64, 64, mode="RGBA"))
    idat = data.find(b"IDAT")
    data[idat + 6] ^= 0xFF
    error = refused(put(bytes(data)))
    assert error.code == "invalid_image"
    assert "checksum" in error.message


def test_a_jpeg_needs_its_end_marker_but_may_carry_a_trailer(put: Callable[..., Path]) -> None:
    data = f.jpeg(40, 40)
    assert inspect_image(put(data + b"trailing camera data" * 10)).width == 40
    assert refused(put(data[:-2])).code == "invalid_image"


def test_a_webp_whose_riff_size_exceeds_the_file_is_invalid(put: Callable[..., Path]) -> None:
    data = bytearray(f.webp(40, 40))
    struct.pack_into("<I", data, 4, len(data) + 100)
    error = refused(put(bytes(data)))
    assert error.code == "invalid_image"
    assert "RIFF" in error.message


def test_a_webp_whose_chunks_do_not_tile_the_riff_is_invalid(put: Callable[..., Path]) -> None:
    data = bytearray(f.webp(40, 40))
    struct.pack_into("<I", data, 16, 2)  # the first chunk now claims 2 bytes, leaving garbage behind it
    assert refused(put(bytes(data))).code == "invalid_image"


def test_a_png_pixel_bomb_is_refused_from_its_header(
    put: Callable[..., Path], peak_memory: Callable[[], int]
) -> None:
    path = put(f.png_bomb(100_000, 100_000))
    tracemalloc.reset_peak()
    error = refused(path)
    assert (error.code, error.param) == ("image_too_large", "image")
    assert "100000x100000" in error.message
    # Decoding even one row pass would need far more; the check reads a few bytes.
    assert peak_memory() < 256 * 1024


def test_an_edge_over_the_bound_is_refused_even_with_few_pixels(put: Callable[..., Path]) -> None:
    error = refused(put(f.png_bomb(40_000, 1)))
    assert error.code == "image_too_large"


def test_the_pixel_limit_is_configurable(put: Callable[..., Path]) -> None:
    path = put(f.png(100, 100))
    assert refused(path, max_pixels=9_999).code == "image_too_large"
    assert inspect_image(path, max_pixels=10_000).width == 100


def test_jpeg_and_webp_bombs_are_refused(put: Callable[..., Path]) -> None:
    assert refused(put(f.jpeg_with_size(60_000, 60_000))).code == "image_too_large"
    data = bytearray(f.webp(64, 48, alpha=True))  # VP8X: 24-bit canvas size fields
    data[24:30] = (16_000 - 1).to_bytes(3, "little") + (16_000 - 1).to_bytes(3, "little")
    assert refused(put(bytes(data))).code == "image_too_large"


def test_memory_does_not_grow_with_the_file_size(
    put: Callable[..., Path], peak_memory: Callable[[], int]
) -> None:
    path = put(f.padded_png(24 * 1024 * 1024))
    tracemalloc.reset_peak()
    info = inspect_image(path)
    assert (info.width, info.size) == (8, path.stat().st_size)
    assert peak_memory() < 1024 * 1024


def edit_inputs(put: Callable[..., Path], images: list[bytes], mask: bytes | None, caps: EditCaps) -> object:
    paths = [put(data) for data in images]
    return inspect_edit_inputs(paths, put(mask) if mask is not None else None, caps=caps)


def test_edit_inputs_accept_images_and_a_matching_mask(put: Callable[..., Path]) -> None:
    result = inspect_edit_inputs(
        [put(f.png(64, 48)), put(f.jpeg(30, 30)), put(f.webp(10, 20))], put(f.mask(64, 48)), caps=GPT_EDIT
    )
    assert [i.format for i in result.images] == ["png", "jpeg", "webp"]
    assert isinstance(result.mask, ImageInfo) and result.mask.has_alpha


@pytest.mark.parametrize(
    ("images", "mask", "caps", "param", "code"),
    [
        ([], None, GPT_EDIT, "image", "missing_required_parameter"),
        ([f.png()] * 17, None, GPT_EDIT, "image", "too_many_images"),
        ([f.png(64, 64), f.png(64, 64)], None, DALLE2_EDIT, "image", "too_many_images"),
        ([f.jpeg(64, 64)], None, DALLE2_EDIT, "image", "invalid_image_format"),
        ([f.png(64, 48)], None, DALLE2_EDIT, "image", "invalid_value"),
        ([f.png(64, 48)], f.mask(64, 48, alpha=False), GPT_EDIT, "mask", "invalid_mask"),
        ([f.png(64, 48)], f.mask(48, 64), GPT_EDIT, "mask", "invalid_mask"),
        ([f.png(64, 48)], f.webp(64, 48, alpha=True), GPT_EDIT, "mask", "invalid_image_format"),
        ([f.png(64, 48)], f.mask(64, 48), EditCaps(16, 10**6, ("png",), mask=False), "mask", "invalid_value"),
    ],
)
def test_edit_rules_per_model(
    put: Callable[..., Path],
    images: list[bytes],
    mask: bytes | None,
    caps: EditCaps,
    param: str,
    code: str,
) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        edit_inputs(put, images, mask, caps)
    assert (caught.value.param, caught.value.code) == (param, code)


def test_the_mask_follows_the_first_image(put: Callable[..., Path]) -> None:
    result = inspect_edit_inputs([put(f.png(64, 48)), put(f.png(10, 10))], put(f.mask(64, 48)), caps=GPT_EDIT)
    assert result.mask is not None and (result.mask.width, result.mask.height) == (64, 48)


def test_byte_limits_per_model_and_for_the_mask_are_413(put: Callable[..., Path]) -> None:
    with pytest.raises(PayloadTooLargeError) as caught:
        edit_inputs(put, [f.padded_png(5 * 1024 * 1024, 64, 64)], None, DALLE2_EDIT)
    assert caught.value.param == "image"
    with pytest.raises(PayloadTooLargeError) as caught:
        edit_inputs(put, [f.png(8, 8)], f.padded_png(5 * 1024 * 1024), GPT_EDIT)
    assert caught.value.param == "mask"


def test_images_over_the_models_total_are_413_each_under_its_own_bound(put: Callable[..., Path]) -> None:
    """Gemini's inline images share one request: each may pass alone, not all together."""
    one = f.png(64, 64)
    caps = EditCaps(
        max_images=14,
        max_image_bytes=len(one),
        formats=("png",),
        mask=False,
        max_total_bytes=2 * len(one),
    )
    assert len(inspect_edit_inputs([put(one), put(one)], None, caps=caps).images) == 2
    with pytest.raises(PayloadTooLargeError) as caught:
        inspect_edit_inputs([put(one), put(one), put(one)], None, caps=caps)
    assert caught.value.param == "image" and "together" in caught.value.message
