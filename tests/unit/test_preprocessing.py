"""Preprocessing shared by the trainer and the gateway (issue 4, "Data and preprocessing"):
services/runtime/preprocessing.py."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile
from PIL import Image, ImageFilter

from contracts.events import ImageStats
from services.runtime.preprocessing import (
    ImageDecodeError,
    ImageInput,
    ImageTooLarge,
    PreprocessSpec,
    UnsupportedImageFormat,
    as_float_image,
    decode,
    decode_samples,
    fit_spec,
    image_stats,
    normalise,
    normalise_pixels,
    pages_for,
    prepare,
    preprocess,
    preprocess_batch,
)
from tests import images

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]


def _png(array: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array, mode).save(buf, format="PNG")
    return buf.getvalue()


def _tiff(array: np.ndarray, **kwargs: Any) -> bytes:
    buf = io.BytesIO()
    tifffile.imwrite(buf, array, **kwargs)
    return buf.getvalue()


def _pillow_pixels(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image)


def _tiff_pixels(data: bytes) -> np.ndarray:
    return tifffile.imread(io.BytesIO(data))


# ---- decode --------------------------------------------------------------------------------------------

# (fixture, expected H x W x C, how to read the stored samples independently, the divisor)
FIXTURES: list[
    tuple[str, Callable[[], bytes], tuple[int, int, int], Callable[[bytes], np.ndarray], float]
] = [
    ("rgb_png", images.rgb_png, (24, 32, 3), _pillow_pixels, 255.0),
    ("gray_png", images.gray_png, (24, 32, 1), _pillow_pixels, 255.0),
    ("gray16_png", images.gray16_png, (24, 32, 1), _pillow_pixels, 65535.0),
    ("jpeg", images.jpeg, (24, 32, 3), _pillow_pixels, 255.0),
    ("gray_jpeg", lambda: images.jpeg(gray=True), (24, 32, 1), _pillow_pixels, 255.0),
    ("gray16_tiff", images.gray16_tiff, (24, 32, 1), _tiff_pixels, 65535.0),
    ("gray16_tiff_zlib", lambda: images.gray16_tiff(compression="zlib"), (24, 32, 1), _tiff_pixels, 65535.0),
    ("multichannel_tiff", images.multichannel_tiff, (24, 32, 5), _tiff_pixels, 65535.0),
    (
        "multichannel_tiff_8bit",
        lambda: images.multichannel_tiff(dtype="uint8"),
        (24, 32, 5),
        _tiff_pixels,
        255.0,
    ),
    ("multipage_tiff", images.multipage_tiff, (24, 32, 4), _tiff_pixels, 65535.0),
    ("pillow_tiff_lzw", images.pillow_tiff, (24, 32, 1), _pillow_pixels, 255.0),
]


@pytest.mark.parametrize(
    ("make", "shape", "read", "divisor"), [f[1:] for f in FIXTURES], ids=[f[0] for f in FIXTURES]
)
def test_every_input_kind_decodes_to_hwc_float32_in_unit_range(
    make: Callable[[], bytes],
    shape: tuple[int, int, int],
    read: Callable[[bytes], np.ndarray],
    divisor: float,
) -> None:
    data = make()
    decoded = decode(data)
    assert decoded.shape == shape
    assert decoded.dtype == np.float32
    assert 0.0 <= decoded.min() and decoded.max() <= 1.0
    stored = read(data)
    if stored.ndim == 3 and stored.shape[0] == shape[2] and stored.shape[2] != shape[2]:
        stored = np.moveaxis(stored, 0, -1)  # a page stack: pages become channels
    expected = stored.reshape(shape).astype(np.float32) / np.float32(divisor)
    np.testing.assert_array_equal(decoded, expected)


def test_a_path_decodes_like_its_bytes(tmp_path: Path) -> None:
    path = tmp_path / "img.tif"
    path.write_bytes(images.multichannel_tiff())
    np.testing.assert_array_equal(decode(path), decode(path.read_bytes()))
    np.testing.assert_array_equal(decode(bytearray(path.read_bytes())), decode(path))


@pytest.mark.parametrize("fmt", ["png", "tiff"])
def test_16_bit_samples_are_divided_by_65535(fmt: str) -> None:
    pixels = np.array([[0, 1, 1000], [32768, 65534, 65535]], dtype=np.uint16)
    data = _png(pixels) if fmt == "png" else _tiff(pixels, photometric="minisblack")
    decoded = decode(data)[:, :, 0]
    assert decoded[0, 2] == np.float32(1000) / np.float32(65535)
    assert decoded[1, 0] == pytest.approx(32768 / 65535, abs=1e-7)
    assert decoded[0, 0] == 0.0 and decoded[1, 2] == 1.0
    np.testing.assert_allclose(decoded, pixels / 65535.0, rtol=0, atol=1e-7)


def test_8_bit_samples_are_divided_by_255() -> None:
    pixels = np.array([[0, 51, 255]], dtype=np.uint8)
    np.testing.assert_array_equal(decode(_png(pixels))[0, :, 0], np.array([0.0, 0.2, 1.0], np.float32))


def test_multipage_tiff_pages_become_channels_or_the_first_page() -> None:
    data = images.multipage_tiff(pages=4)
    stack = _tiff_pixels(data)  # (4, 24, 32)
    everything = decode(data, pages="all")
    first = decode(data, pages="first")
    assert everything.shape == (24, 32, 4) and first.shape == (24, 32, 1)
    for page in range(4):
        np.testing.assert_array_equal(everything[:, :, page], stack[page] / np.float32(65535))
    np.testing.assert_array_equal(first[:, :, 0], everything[:, :, 0])


def test_tiff_other_depths_and_layouts() -> None:
    floats = np.array([[-0.5, 0.25, 2.0, np.nan]], dtype=np.float32)
    np.testing.assert_array_equal(decode(_tiff(floats))[0, :, 0], [0.0, 0.25, 1.0, 0.0])
    signed = np.array([[-100, 0, 16383, 32767]], dtype=np.int16)
    np.testing.assert_allclose(decode(_tiff(signed))[0, :, 0], [0.0, 0.0, 16383 / 32767, 1.0], atol=1e-7)
    white = np.array([[0, 255]], dtype=np.uint8)
    np.testing.assert_array_equal(decode(_tiff(white, photometric="miniswhite"))[0, :, 0], [1.0, 0.0])
    rgb = np.random.default_rng(1).integers(0, 256, (3, 8, 10), dtype=np.uint8)  # planar: S, Y, X
    planar = decode(_tiff(rgb, photometric="rgb", planarconfig="separate"))
    np.testing.assert_array_equal(planar, np.moveaxis(rgb, 0, -1) / np.float32(255))
    rgba = np.random.default_rng(2).integers(0, 256, (8, 10, 4), dtype=np.uint8)
    with_alpha = decode(_tiff(rgba, photometric="rgb", extrasamples=["unassalpha"]))
    np.testing.assert_array_equal(with_alpha, rgba[:, :, :3] / np.float32(255))


def test_pillow_modes_alpha_palette_and_exif_orientation() -> None:
    rgba = np.random.default_rng(3).integers(0, 256, (6, 7, 4), dtype=np.uint8)
    np.testing.assert_array_equal(decode(_png(rgba, "RGBA")), rgba[:, :, :3] / np.float32(255))
    gray_alpha = Image.fromarray(rgba[:, :, :2].copy(), "LA")
    buf = io.BytesIO()
    gray_alpha.save(buf, format="PNG")
    np.testing.assert_array_equal(decode(buf.getvalue()), rgba[:, :, :1] / np.float32(255))
    palette = Image.fromarray(rgba[:, :, :3].copy(), "RGB").quantize(8)
    buf = io.BytesIO()
    palette.save(buf, format="PNG")
    np.testing.assert_array_equal(
        decode(buf.getvalue()), np.asarray(palette.convert("RGB")) / np.float32(255)
    )
    # A phone photo stored sideways with orientation 6 ("rotate 90 degrees clockwise to view").
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    Image.fromarray(rgba[:, :, :3].copy(), "RGB").save(buf, format="JPEG", exif=exif.tobytes())
    assert decode(buf.getvalue()).shape == (7, 6, 3)


def _encoded(array: np.ndarray, mode: str, fmt: str, **save: Any) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array, mode).save(buf, format=fmt, **save)
    return buf.getvalue()


def test_8_bit_pngs_and_jpegs_give_their_samples_which_decode_scales() -> None:
    rng = np.random.default_rng(11)
    rgba = rng.integers(0, 256, (9, 9, 4), dtype=np.uint8)
    eight_bit = [
        _encoded(rgba[:, :, 0].copy(), "L", "PNG"),
        _encoded(rgba[:, :, :3].copy(), "RGB", "PNG"),
        _encoded(rgba, "RGBA", "PNG"),
        _encoded(rgba[:, :, :2].copy(), "LA", "PNG"),
        _encoded(rgba[:, :, :3].copy(), "RGB", "JPEG", quality=90),
        _encoded(rgba[:, :, 0].copy(), "L", "JPEG"),
    ]
    palette = Image.fromarray(rgba[:, :, :3].copy(), "RGB").quantize(8)
    buf = io.BytesIO()
    palette.save(buf, format="PNG")
    eight_bit.append(buf.getvalue())
    for data in eight_bit:
        samples = decode_samples(data)
        assert samples.dtype == np.uint8 and samples.ndim == 3
        assert as_float_image(samples).tobytes() == decode(data).tobytes()  # decode divides them by 255
    # other depths and TIFFs: decode's floats
    sixteen = rng.integers(0, 65536, (9, 9), dtype=np.uint16)
    for data in (_png(sixteen), _tiff(rgba[:, :, :3]), _tiff(sixteen, photometric="minisblack")):
        samples = decode_samples(data)
        assert samples.dtype == np.float32 and samples.tobytes() == decode(data).tobytes()
    with pytest.raises(UnsupportedImageFormat):
        decode_samples(images.gif())


@pytest.mark.parametrize(("channels", "size"), [(1, 9), (3, 9), (3, 224)])
def test_pixels_normalise_to_the_bits_of_the_float_path(channels: int, size: int) -> None:
    """What the gateway sends as uint8 ``pixels`` and the model normalises equals, to the bit, what it
    would have sent as float32 ``image``: ``normalise(prepare(bytes))``."""
    rng = np.random.default_rng(size + channels)
    spec = PreprocessSpec(
        size=size,
        channels=channels,
        mean=tuple(rng.uniform(0.1, 0.9, channels)),
        std=tuple(rng.uniform(0.05, 0.5, channels)),
    )
    mode = "L" if channels == 1 else "RGB"
    shape = (size, size) if channels == 1 else (size, size, 3)
    encoded = [_encoded(rng.integers(0, 256, shape, dtype=np.uint8), mode, fmt) for fmt in ("PNG", "JPEG")]
    pixels = np.stack([decode_samples(data).transpose(2, 0, 1) for data in encoded])
    assert pixels.dtype == np.uint8 and pixels.shape == (2, channels, size, size)
    ours = normalise_pixels(pixels, spec)
    for row, data in zip(ours, encoded, strict=True):
        assert row.dtype == np.float32 and row.tobytes() == preprocess(data, spec).tobytes()


@pytest.mark.parametrize(
    ("make", "error"),
    [
        (images.empty, ImageDecodeError),
        (images.garbage, UnsupportedImageFormat),
        (images.text, UnsupportedImageFormat),
        (images.gif, UnsupportedImageFormat),
        (images.bmp, UnsupportedImageFormat),
        (images.truncated_png, ImageDecodeError),
        (images.truncated_jpeg, ImageDecodeError),
        (images.truncated_tiff, ImageDecodeError),
        (images.png_bomb, ImageTooLarge),
        (images.jpeg_bomb, ImageTooLarge),
        (images.tiff_bomb, ImageTooLarge),
    ],
    ids=lambda v: getattr(v, "__name__", ""),
)
def test_undecodable_input_raises_value_error_with_a_reason(
    make: Callable[[], bytes], error: type[ImageDecodeError]
) -> None:
    with pytest.raises(error) as caught:
        decode(make())
    assert isinstance(caught.value, ValueError)
    assert str(caught.value)


def test_max_pixels_is_checked_before_decoding() -> None:
    decode(images.rgb_png(32, 24), max_pixels=32 * 24)
    with pytest.raises(ImageTooLarge, match="768"):
        decode(images.rgb_png(32, 24), max_pixels=32 * 24 - 1)
    with pytest.raises(ImageTooLarge, match="pages"):
        decode(images.multipage_tiff(32, 24, pages=4), max_pixels=32 * 24 * 3)
    decode(images.multipage_tiff(32, 24, pages=4), pages="first", max_pixels=32 * 24)
    with pytest.raises(ImageTooLarge):
        preprocess(images.rgb_png(32, 24), PreprocessSpec.identity(8, 3), max_pixels=100)


def test_decode_takes_bytes_or_a_path_only() -> None:
    with pytest.raises(TypeError):
        decode("img.png")  # type: ignore[arg-type]


def test_as_float_image_scales_arrays_like_decode() -> None:
    gray = np.array([[0, 255]], dtype=np.uint8)
    assert as_float_image(gray).shape == (1, 2, 1)
    np.testing.assert_array_equal(as_float_image(gray)[0, :, 0], [0.0, 1.0])
    np.testing.assert_array_equal(as_float_image(np.array([[65535]], np.uint16)), [[[1.0]]])
    np.testing.assert_array_equal(as_float_image(np.array([[True, False]])), [[[1.0], [0.0]]])
    np.testing.assert_array_equal(as_float_image(np.array([[2.0, -1.0]])), [[[1.0], [0.0]]])
    with pytest.raises(ValueError):
        as_float_image(np.zeros((2, 2, 2, 2), np.float32))


# ---- channels and resize -------------------------------------------------------------------------------


def test_rgb_to_gray_is_bt601_luminance() -> None:
    colours = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 255]]], dtype=np.uint8)
    gray = prepare(colours, PreprocessSpec.identity(size=4, channels=1))  # 1x4 -> 4x4: rows repeat
    np.testing.assert_allclose(gray[0, :, 0], [0.299, 0.587, 0.114, 1.0], atol=1e-6)
    # ...and agrees with Pillow's convert("L") on a real image within its 8-bit rounding.
    data = images.rgb_png(32, 32)
    ours = prepare(data, PreprocessSpec.identity(32, 1))[:, :, 0]
    with Image.open(io.BytesIO(data)) as image:
        pillow = np.asarray(image.convert("L")) / 255.0
    np.testing.assert_allclose(ours, pillow, atol=0.5 / 255 + 1e-6)


def test_gray_to_rgb_repeats_the_gray_channel() -> None:
    data = images.gray_png(32, 32)
    rgb = prepare(data, PreprocessSpec.identity(32, 3))
    assert rgb.shape == (32, 32, 3)
    for channel in range(3):
        np.testing.assert_array_equal(rgb[:, :, channel], decode(data)[:, :, 0])


def test_multichannel_takes_the_first_channels_or_repeats_cyclically() -> None:
    data = images.multichannel_tiff(32, 32, channels=5)
    stack = decode(data)
    np.testing.assert_array_equal(prepare(data, PreprocessSpec.identity(32, 3)), stack[:, :, :3])
    np.testing.assert_array_equal(prepare(data, PreprocessSpec.identity(32, 1)), stack[:, :, :1])
    eight = prepare(data, PreprocessSpec.identity(32, 8))
    np.testing.assert_array_equal(eight, stack[:, :, [0, 1, 2, 3, 4, 0, 1, 2]])
    two = np.random.default_rng(4).random((32, 32, 2), dtype=np.float32)
    np.testing.assert_array_equal(prepare(two, PreprocessSpec.identity(32, 3)), two[:, :, [0, 1, 0]])


def test_multipage_tiff_pages_are_channels_unless_the_spec_wants_one() -> None:
    data = images.multipage_tiff(32, 32, pages=3)
    pages = decode(data)
    np.testing.assert_array_equal(prepare(data, PreprocessSpec.identity(32, 3)), pages)
    np.testing.assert_array_equal(prepare(data, PreprocessSpec.identity(32, 2)), pages[:, :, :2])
    # One channel: the first page, not the luminance of three pages taken for RGB.
    np.testing.assert_array_equal(prepare(data, PreprocessSpec.identity(32, 1)), pages[:, :, :1])
    assert pages_for(PreprocessSpec.identity(32, 1)) == "first"
    assert pages_for(PreprocessSpec.identity(32, 4)) == "all"


@pytest.mark.parametrize("size", [8, 28, 32, 64])
@pytest.mark.parametrize("make", [images.rgb_png, images.gray16_tiff, images.multipage_tiff, images.jpeg])
def test_every_input_resizes_to_the_spec_size(make: Callable[..., bytes], size: int) -> None:
    for channels in (1, 3, 4):
        out = preprocess(make(), PreprocessSpec.identity(size, channels))
        assert out.shape == (channels, size, size) and out.dtype == np.float32
        assert 0.0 <= out.min() and out.max() <= 1.0


@pytest.mark.parametrize(
    ("height", "width", "size"), [(24, 32, 32), (100, 37, 32), (7, 5, 32), (512, 300, 28)]
)
def test_resize_is_pillows_bilinear(height: int, width: int, size: int) -> None:
    gray = np.random.default_rng(5).random((height, width), dtype=np.float32)
    ours = prepare(gray, PreprocessSpec.identity(size, 1))[:, :, 0]
    pillow = np.asarray(Image.fromarray(gray, "F").resize((size, size), Image.Resampling.BILINEAR))
    np.testing.assert_allclose(ours, pillow, rtol=0, atol=1e-6)


def test_resize_keeps_a_constant_image_constant_and_leaves_the_spec_size_alone() -> None:
    flat = np.full((50, 70, 3), 0.25, dtype=np.float32)
    np.testing.assert_allclose(prepare(flat, PreprocessSpec.identity(32, 3)), 0.25, atol=1e-6)
    image = np.random.default_rng(6).random((32, 32, 3), dtype=np.float32)
    np.testing.assert_array_equal(prepare(image, PreprocessSpec.identity(32, 3)), image)


# ---- normalisation, batches, fitting -------------------------------------------------------------------


def test_normalisation_with_a_fitted_spec_gives_zero_mean_unit_std_on_its_data() -> None:
    train = [images.rgb_png(40, 30, seed=seed) for seed in range(20)]
    spec = fit_spec(train, size=32, channels=3)
    assert spec.size == 32 and spec.channels == 3
    batch = preprocess_batch(train, spec)
    assert batch.shape == (20, 3, 32, 32)
    np.testing.assert_allclose(batch.mean(axis=(0, 2, 3)), 0.0, atol=1e-5)
    np.testing.assert_allclose(batch.std(axis=(0, 2, 3)), 1.0, atol=1e-4)
    # Per channel: the fitted mean is that of the prepared images.
    prepared = np.stack([prepare(image, PreprocessSpec.identity(32, 3)) for image in train])
    np.testing.assert_allclose(spec.mean, prepared.mean(axis=(0, 1, 2)), atol=1e-6)


def test_fit_spec_on_mixed_inputs_and_edge_cases() -> None:
    mixed: list[ImageInput] = [
        images.gray16_tiff(),
        images.rgb_png(),
        np.random.default_rng(7).random((20, 20)),
    ]
    spec = fit_spec(mixed, size=16, channels=1)
    batch = preprocess_batch(mixed, spec)
    assert abs(float(batch.mean())) < 1e-5 and abs(float(batch.std()) - 1.0) < 1e-4
    constant = fit_spec([np.full((8, 8), 0.5)], size=8, channels=1)
    assert constant.mean == (0.5,) and constant.std == (1.0,)
    with pytest.raises(ValueError, match="at least one"):
        fit_spec([], size=8, channels=1)


def test_preprocess_inputs_agree_and_batches_are_stacked_singles(tmp_path: Path) -> None:
    spec = PreprocessSpec(size=32, channels=3, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
    data = images.rgb_png(32, 24)
    path = tmp_path / "x.png"
    path.write_bytes(data)
    one = preprocess(data, spec)
    assert one.shape == (3, 32, 32) and one.dtype == np.float32 and one.flags.c_contiguous
    np.testing.assert_array_equal(preprocess(path, spec), one)
    np.testing.assert_array_equal(preprocess(decode(data), spec), one)
    expected = (prepare(data, spec).transpose(2, 0, 1) - np.float32(0.5)) / np.float32(0.2)
    np.testing.assert_allclose(one[0], expected[0], atol=1e-6)
    items: list[ImageInput] = [data, path, images.gray_png(), images.multichannel_tiff(), images.jpeg()]
    batch = preprocess_batch(items, spec)
    assert batch.shape == (5, 3, 32, 32) and batch.dtype == np.float32 and batch.flags.c_contiguous
    for index, item in enumerate(items):
        np.testing.assert_array_equal(batch[index], preprocess(item, spec))
    assert preprocess_batch(iter([]), spec).shape == (0, 3, 32, 32)
    with pytest.raises(ImageDecodeError, match=r"^image 1: "):
        preprocess_batch([data, images.truncated_png()], spec)
    with pytest.raises(ValueError):
        normalise(np.zeros((16, 16, 3), np.float32), spec)


# ---- the spec ------------------------------------------------------------------------------------------


def test_spec_json_round_trip() -> None:
    spec = fit_spec([images.rgb_png(seed=s) for s in range(3)], size=28, channels=3)
    text = json.dumps(spec.to_dict())
    again = PreprocessSpec.from_dict(json.loads(text))
    assert again == spec
    assert again.to_dict() == spec.to_dict()
    assert json.loads(text) == {
        "format": 1,
        "size": 28,
        "channels": 3,
        "mean": list(spec.mean),
        "std": list(spec.std),
        "interpolation": "bilinear",
    }
    assert PreprocessSpec.from_dict({"size": 8, "channels": 1, "mean": [0], "std": [1]}) == (
        PreprocessSpec.identity(8, 1)
    )
    assert hash(spec) == hash(again)


@pytest.mark.parametrize(
    "data",
    [
        {"size": 32, "channels": 3, "mean": [0.5], "std": [0.2, 0.2, 0.2]},
        {"size": 32, "channels": 1, "mean": [0.5], "std": [0.0]},
        {"size": 0, "channels": 1, "mean": [0.5], "std": [1.0]},
        {"size": 32, "channels": 1, "mean": [float("nan")], "std": [1.0]},
        {"size": 32, "channels": 1, "mean": [0.5], "std": [1.0], "resize": "crop"},
        {"size": 32, "channels": 1, "mean": [0.5], "std": [1.0], "format": 2},
        {"size": 32, "channels": 1, "mean": [0.5]},
        {"size": 32, "channels": 1, "mean": [0.5], "std": [1.0], "interpolation": "nearest"},
    ],
)
def test_spec_refuses_invalid_data(data: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        PreprocessSpec.from_dict(data)


# ---- image statistics ----------------------------------------------------------------------------------


def test_image_stats_of_a_constant_image() -> None:
    stats = image_stats(np.full((32, 32, 3), 0.4, dtype=np.float32))
    assert set(stats) == {"mean", "std", "contrast", "sharpness"}
    assert all(type(value) is float for value in stats.values())
    assert stats["mean"] == pytest.approx(0.4)
    assert stats["std"] == pytest.approx(0.0, abs=1e-9)
    assert stats["contrast"] == pytest.approx(0.0, abs=1e-9)
    assert stats["sharpness"] == pytest.approx(0.0, abs=1e-9)
    ImageStats(**stats)  # what the gateway logs in inference.logged
    assert image_stats(np.zeros((2, 2), np.float32))["sharpness"] == 0.0


def test_blur_lowers_sharpness_and_brightening_raises_mean() -> None:
    spec = PreprocessSpec.identity(32, 3)
    data = images.rgb_png(32, 32)
    with Image.open(io.BytesIO(data)) as image:
        buf = io.BytesIO()
        image.filter(ImageFilter.GaussianBlur(1.5)).save(buf, format="PNG")
    original = image_stats(prepare(data, spec))
    blurred = image_stats(prepare(buf.getvalue(), spec))
    assert blurred["sharpness"] < 0.5 * original["sharpness"]
    assert blurred["contrast"] < original["contrast"]
    assert blurred["mean"] == pytest.approx(original["mean"], abs=0.02)
    prepared = prepare(data, spec)
    brighter = image_stats(np.clip(prepared + 0.2, 0.0, 1.0))
    assert brighter["mean"] > original["mean"] + 0.15
    darker_flat = image_stats(prepared * 0.5)
    assert darker_flat["contrast"] == pytest.approx(original["contrast"] * 0.5, rel=1e-6)
    assert darker_flat["sharpness"] == pytest.approx(original["sharpness"] * 0.25, rel=1e-6)


def test_image_stats_is_deterministic_and_scales_integer_arrays() -> None:
    image = np.random.default_rng(8).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    first = image_stats(image)
    assert image_stats(image) == first
    assert image_stats(image.astype(np.float32) / np.float32(255)) == pytest.approx(first, abs=1e-9)
    assert 0.0 <= first["contrast"] <= 1.0


# ---- no torch ----------------------------------------------------------------------------------------------


def test_the_module_imports_no_torch() -> None:
    code = "import services.runtime.preprocessing, sys; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)


def test_the_contrast_percentiles_equal_numpys():
    """``image_stats`` takes p2 and p98 from the tails a sample points at (large images) or one partition;
    the values must be numpy's to the bit, or the reference profiles the trainer computed and the gateway's
    live statistics would disagree. Also where the sample misleads: tails the strided sample never sees,
    sorted values, many ties."""
    from services.runtime.preprocessing import _percentiles

    rng = np.random.default_rng(0)
    for n in (1, 2, 3, 7, 50, 1024, 8191, 8192, 50_176, 200_000):
        for trial in range(30):
            values = rng.random(n)
            if trial % 5 == 1:
                values = np.round(values, 1)  # ties
            elif trial % 5 == 2 and n >= 2048:  # the sample (every step-th value) misleads
                step = n // 1024
                if trial % 2:  # extremes it never sees
                    hidden = np.flatnonzero(np.arange(n) % step != 0)
                    values[rng.choice(hidden, n // 10, replace=False)] = rng.choice([-5.0, 5.0], n // 10)
                else:  # extremes only where it looks: its tails are far too thick (the whole partition)
                    values[::step] = rng.choice([-5.0, 5.0], len(values[::step]))
            elif trial % 5 == 3:
                values = np.sort(values)[:: 1 if trial % 2 else -1]
            elif trial % 5 == 4:
                values = (rng.random(n) < 0.99) * 0.5  # almost all equal
            for qs in ((2.0, 98.0), (0.0, 50.0, 100.0)):
                assert _percentiles(values, *qs) == list(np.percentile(values, qs)), (n, trial, qs)


def test_the_image_statistics_equal_numpys():
    """The gray image is numpy's mean over the channels, and mean, std and the Laplacian's variance come
    from ``_mean_var``: they must be numpy's ``mean``, ``std`` and ``var`` to the bit, for the same reason as
    the percentiles."""
    rng = np.random.default_rng(1)
    for trial in range(300):
        height, width = (int(v) for v in rng.integers(1, 70 if trial % 10 else 260, 2))
        image = rng.random((height, width, int(rng.choice([1, 2, 3, 4, 5, 9]))), dtype=np.float32)
        gray = image.mean(axis=2, dtype=np.float64)
        stats = image_stats(image)
        assert (stats["mean"], stats["std"]) == (float(gray.mean()), float(gray.std()))
        if height >= 3 and width >= 3:
            laplacian = (
                gray[1:-1, :-2] + gray[1:-1, 2:] + gray[:-2, 1:-1] + gray[2:, 1:-1] - 4.0 * gray[1:-1, 1:-1]
            )
            assert stats["sharpness"] == float(laplacian.var())
