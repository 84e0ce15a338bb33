"""Validation of object keys and image files (issue 3, "Validation"): services/ingest/validation.py."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image, ImageFile

from services.ingest.validation import (
    DEFAULT_LIMITS,
    REASON_CODES,
    ImageInfo,
    Limits,
    ObjectPath,
    Rejection,
    check_image,
    dataset_of_key,
    parse_key,
)
from tests import images

pytestmark = pytest.mark.unit


# ---- keys ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "dataset", "label", "filename"),
    [
        ("digits/7/img-001.png", "digits", "7", "img-001.png"),
        ("cells-v2/mitosis/plate 3_well A1.tif", "cells-v2", "mitosis", "plate 3_well A1.tif"),
        ("cells/0/Zelle Ä 日本.TIFF", "cells", "0", "Zelle Ä 日本.TIFF"),
        ("cells/0/naïve 🔬.png", "cells", "0", "naïve 🔬.png"),
        ("a/b/img..png", "a", "b", "img..png"),
    ],
)
def test_good_keys_parse(key: str, dataset: str, label: str, filename: str) -> None:
    parsed = parse_key(key)
    assert parsed == ObjectPath(dataset, label, filename)
    assert isinstance(parsed, ObjectPath)
    assert parsed.path == f"{label}/{filename}"
    assert parsed.key == key


@pytest.mark.parametrize(
    ("key", "code", "hint"),
    [
        ("digits/7/../x.png", "bad_key", "'..'"),
        ("digits/../7/x.png", "bad_key", "'..'"),
        ("../digits/7/x.png", "bad_key", "'..'"),
        ("digits/./x.png", "bad_key", "'..'"),
        ("/digits/7/x.png", "bad_key", "absolute"),
        ("digits//7/x.png", "bad_key", "'//'"),
        ("digits/7//x.png", "bad_key", "'//'"),
        ("digits\\7\\x.png", "bad_key", "backslash"),
        ("digits/7/x\x00.png", "bad_key", "U+0000"),
        ("digits/7/x\n.png", "bad_key", "U+000A"),
        ("digits/7/x\x7f.png", "bad_key", "U+007F"),
        ("digits/7/x\u202egnp.exe", "bad_key", "U+202E"),
        ("digits/7/\ufffd.png", "bad_key", "UTF-8"),
        ("digits/7/\udcff.png", "bad_key", "UTF-8"),
        ("digits/7/.DS_Store", "bad_key", "hidden"),
        ("digits/7/._img.png", "bad_key", "hidden"),
        ("digits/7/img.png.part", "bad_key", "partial"),
        ("digits/7/img.png.tmp", "bad_key", "partial"),
        ("digits/7/" + "a" * 256, "bad_key", "255 bytes"),
        ("digits/7/" + "a" * 1100, "bad_key", "1024"),
        ("", "bad_key", "empty"),
        ("digits/7/", "bad_layout", "folder marker"),
        ("digits/img.png", "bad_layout", "2 segments"),
        ("img.png", "bad_layout", "1 segment;"),
        ("digits/7/extra/img.png", "bad_layout", "4 segments"),
        ("Digits/7/img.png", "bad_name", "dataset"),
        ("digits_v2/7/img.png", "bad_name", "dataset"),
        ("digits/Seven/img.png", "bad_name", "label"),
        ("digits/-7/img.png", "bad_name", "label"),
        ("digits/sept ember/img.png", "bad_name", "label"),
    ],
)
def test_bad_keys_are_refused_with_a_reason(key: str, code: str, hint: str) -> None:
    rejection = parse_key(key)
    assert isinstance(rejection, Rejection)
    assert rejection.code == code
    assert hint in rejection.reason
    assert rejection.code in REASON_CODES


def test_reason_names_the_name_rule() -> None:
    rejection = parse_key("digits/Seven/img.png")
    assert isinstance(rejection, Rejection)
    assert "'Seven'" in rejection.reason and "lower-case" in rejection.reason


@pytest.mark.parametrize(
    ("key", "dataset"),
    [
        ("digits/7/a.png", "digits"),
        ("digits/a.png", "digits"),
        ("Digits/7/a.png", "unknown"),
        ("", "unknown"),
    ],
)
def test_dataset_of_key(key: str, dataset: str) -> None:
    assert dataset_of_key(key) == dataset


# ---- accepted images -----------------------------------------------------------------------------------


def _info(fmt: str, w: int, h: int, channels: int, dtype: str, bits: int, pages: int = 1) -> ImageInfo:
    return ImageInfo(fmt, w, h, channels, pages, dtype, bits, w * h * pages)  # type: ignore[arg-type]


ACCEPTED: list[tuple[str, Callable[[], bytes], ImageInfo]] = [
    ("rgb png", lambda: images.rgb_png(40, 30), _info("PNG", 40, 30, 3, "uint8", 8)),
    ("gray png", lambda: images.gray_png(40, 30), _info("PNG", 40, 30, 1, "uint8", 8)),
    ("16-bit png", lambda: images.gray16_png(40, 30), _info("PNG", 40, 30, 1, "uint16", 16)),
    ("animated png", lambda: images.animated_png(40, 30, frames=3), _info("PNG", 40, 30, 1, "uint8", 8, 3)),
    ("jpeg", lambda: images.jpeg(40, 30), _info("JPEG", 40, 30, 3, "uint8", 8)),
    ("gray jpeg", lambda: images.jpeg(40, 30, gray=True), _info("JPEG", 40, 30, 1, "uint8", 8)),
    ("progressive", lambda: images.jpeg(40, 30, progressive=True), _info("JPEG", 40, 30, 3, "uint8", 8)),
    ("16-bit tiff", lambda: images.gray16_tiff(40, 30), _info("TIFF", 40, 30, 1, "uint16", 16)),
    (
        "deflate tiff",
        lambda: images.gray16_tiff(40, 30, compression="zlib"),
        _info("TIFF", 40, 30, 1, "uint16", 16),
    ),
    ("3-channel tiff", lambda: images.multichannel_tiff(40, 30, 3), _info("TIFF", 40, 30, 3, "uint16", 16)),
    ("5-channel tiff", lambda: images.multichannel_tiff(40, 30, 5), _info("TIFF", 40, 30, 5, "uint16", 16)),
    (
        "8-bit 5-channel",
        lambda: images.multichannel_tiff(40, 30, 5, dtype="uint8"),
        _info("TIFF", 40, 30, 5, "uint8", 8),
    ),
    ("multi-page tiff", lambda: images.multipage_tiff(40, 30, 6), _info("TIFF", 40, 30, 1, "uint16", 16, 6)),
    ("lzw tiff (pillow)", lambda: images.pillow_tiff(40, 30), _info("TIFF", 40, 30, 1, "uint8", 8)),
    (
        "jpeg tiff (pillow)",
        lambda: images.pillow_tiff(40, 30, compression="jpeg"),
        _info("TIFF", 40, 30, 1, "uint8", 8),
    ),
]


@pytest.mark.parametrize(("make", "expected"), [a[1:] for a in ACCEPTED], ids=[a[0] for a in ACCEPTED])
def test_accepted_formats_decode_with_the_right_info(make: Callable[[], bytes], expected: ImageInfo) -> None:
    assert check_image(make()) == expected


@pytest.mark.parametrize(("make", "expected"), [a[1:] for a in ACCEPTED], ids=[a[0] for a in ACCEPTED])
def test_a_path_gives_the_same_answer_as_bytes(
    make: Callable[[], bytes], expected: ImageInfo, tmp_path: Path
) -> None:
    path = tmp_path / "image"
    path.write_bytes(make())
    assert check_image(path) == expected


def test_the_default_limits_admit_a_200_mb_16_bit_tiff() -> None:
    data = images.large_tiff16(10_000, 10_000)
    assert len(data) > 200_000_000
    assert check_image(data, DEFAULT_LIMITS) == _info("TIFF", 10_000, 10_000, 1, "uint16", 16)


def test_every_digit_image_is_a_valid_file_under_a_valid_key(tmp_path: Path) -> None:
    items = images.digits_images()
    assert len(items) == 1797
    assert {label for label, _, _ in items} == {str(d) for d in range(10)}
    for label, filename, png in items[:50]:
        assert check_image(png) == _info("PNG", 32, 32, 1, "uint8", 8)
        assert isinstance(parse_key(f"digits/{label}/{filename}"), ObjectPath)
    paths = images.write_imagefolder(tmp_path, items[:20])
    assert [p.relative_to(tmp_path).as_posix() for p in paths] == [f"{lb}/{fn}" for lb, fn, _ in items[:20]]
    assert paths[0].read_bytes() == items[0][2]


def test_decoded_pixels_are_what_the_fixture_wrote() -> None:
    # Guards the fixtures themselves: a 16-bit TIFF really holds values above 255.
    with tifffile.TiffFile(io.BytesIO(images.gray16_tiff(40, 30))) as tif:
        assert tif.pages[0].asarray().max() > 255
    with Image.open(io.BytesIO(images.gray16_png(40, 30))) as image:
        assert image.getextrema()[1] > 255  # type: ignore[operator]


# ---- refused images ------------------------------------------------------------------------------------


def _rejected(data: bytes | Path, limits: Limits = DEFAULT_LIMITS) -> Rejection:
    result = check_image(data, limits)
    assert isinstance(result, Rejection), result
    assert result.code in REASON_CODES
    return result


def _corrupt_deflate_tiff() -> bytes:
    data = bytearray(images.gray16_tiff(64, 64, compression="zlib"))
    with tifffile.TiffFile(io.BytesIO(bytes(data))) as tif:
        offset = tif.pages[0].dataoffsets[0]
    data[offset + 20 : offset + 40] = b"\xff" * 20
    return bytes(data)


def _truncated_progressive_jpeg() -> bytes:
    data = images.jpeg(200, 200, progressive=True)
    return data[: len(data) // 2]


REFUSED: list[tuple[str, Callable[[], bytes], str, str]] = [
    ("zero bytes", images.empty, "empty", "0 bytes"),
    ("corrupt png", images.corrupt_png, "undecodable", "CRC"),
    ("truncated png", images.truncated_png, "undecodable", "truncated"),
    ("png without IEND", lambda: images.rgb_png()[:-12], "undecodable", "IEND"),
    ("png signature only", lambda: b"\x89PNG\r\n\x1a\n", "undecodable", "IHDR"),
    ("truncated jpeg", images.truncated_jpeg, "undecodable", "truncated"),
    ("truncated progressive", _truncated_progressive_jpeg, "undecodable", "truncated"),
    ("jpeg signature only", lambda: b"\xff\xd8\xff", "undecodable", "JPEG"),
    ("truncated tiff", images.truncated_tiff, "undecodable", "truncated"),
    ("truncated lzw tiff", lambda: images.pillow_tiff(64, 64)[:300], "undecodable", "truncated"),
    ("corrupt deflate tiff", _corrupt_deflate_tiff, "undecodable", "decoder says"),
    ("tiff header only", lambda: b"II*\x00", "undecodable", "TIFF"),
    ("gif", images.gif, "unsupported_format", "GIF"),
    ("bmp", images.bmp, "unsupported_format", "BMP"),
    ("text", images.text, "unsupported_format", "text"),
    ("garbage", images.garbage, "unsupported_format", "unknown format"),
    ("pdf", lambda: b"%PDF-1.7\n" + b"\x00" * 100, "unsupported_format", "PDF"),
]


@pytest.mark.parametrize(("make", "code", "hint"), [r[1:] for r in REFUSED], ids=[r[0] for r in REFUSED])
def test_bad_files_are_refused_with_a_reason(make: Callable[[], bytes], code: str, hint: str) -> None:
    rejection = _rejected(make())
    assert rejection.code == code
    assert hint in rejection.reason
    if code == "unsupported_format":
        assert "PNG, JPEG or TIFF" in rejection.reason


def test_a_file_over_the_byte_limit_is_too_large_before_anything_is_read(tmp_path: Path) -> None:
    rejection = _rejected(images.rgb_png(), Limits(max_bytes=1_000))
    assert rejection.code == "too_large"
    assert "over the limit of 1 kB (CONVEYOR_INGEST_MAX_BYTES)" in rejection.reason
    # Size comes from the file system: even a file that is not an image is refused for its size first.
    path = tmp_path / "big.bin"
    path.write_bytes(images.garbage(2_000))
    assert _rejected(path, Limits(max_bytes=1_000)).code == "too_large"


def test_a_zero_byte_file_on_disk_is_empty(tmp_path: Path) -> None:
    path = tmp_path / "empty.png"
    path.touch()
    assert _rejected(path).code == "empty"


BOMBS: list[tuple[str, Callable[[], bytes], str]] = [
    ("png", images.png_bomb, "100000x100000 = 10 Gpx"),
    ("jpeg", images.jpeg_bomb, "65000x65000 = 4.22 Gpx"),
    ("tiff", images.tiff_bomb, "100000x100000 = 10 Gpx"),
]


@pytest.mark.parametrize(("fmt", "make", "declared"), BOMBS, ids=[b[0] for b in BOMBS])
def test_decompression_bombs_are_refused_before_any_pixel_is_decoded(
    fmt: str, make: Callable[[], bytes], declared: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """From the header alone: every decoder check_image may call raises here (how long a refusal takes is
    measured by bench/preprocess.py)."""
    bomb = make()
    assert len(bomb) < 10_000
    small = {"png": images.rgb_png, "jpeg": images.jpeg, "tiff": images.gray16_tiff}[fmt]()

    def decoded(*args: object, **kwargs: object) -> None:
        raise AssertionError("a decoder ran")

    for owner, name in ((ImageFile.ImageFile, "load"), (Image.Image, "load"), (tifffile.TiffPage, "asarray")):
        monkeypatch.setattr(owner, name, decoded)
    assert "a decoder ran" in _rejected(small).reason, "a decoder is not caught: the test would prove nothing"
    rejection = _rejected(bomb)
    assert rejection.code == "too_many_pixels"
    assert declared in rejection.reason
    assert "over the limit of 250 Mpx (CONVEYOR_INGEST_MAX_PIXELS)" in rejection.reason


def test_the_pixel_limit_reason_reads_like_the_example() -> None:
    rejection = _rejected(images.png_bomb(40_000, 40_000))
    assert rejection.reason.startswith(
        "the PNG declares 40000x40000 = 1.6 Gpx, over the limit of 250 Mpx (CONVEYOR_INGEST_MAX_PIXELS)"
    )


def test_a_stack_over_the_pixel_limit_is_refused_before_decoding() -> None:
    rejection = _rejected(images.multipage_tiff(100, 100, pages=10), Limits(max_pixels=50_000))
    assert rejection.code == "too_many_pixels"
    assert "first 6 pages declare 60 kpx in total" in rejection.reason


def test_an_animated_png_counts_every_frame() -> None:
    rejection = _rejected(images.animated_png(100, 100, frames=5), Limits(max_pixels=30_000))
    assert rejection.code == "too_many_pixels"
    assert "5 frames" in rejection.reason


def test_a_tiff_with_many_samples_per_pixel_is_bounded_by_its_decoded_size() -> None:
    # 20x20 pixels pass a limit of 400, but 64 float64 samples each decode to 200 kB, over 400 x 8 bytes.
    data = io.BytesIO()
    tifffile.imwrite(data, np.zeros((20, 20, 64)), photometric="minisblack", planarconfig="contig")
    rejection = _rejected(data.getvalue(), Limits(max_pixels=400))
    assert rejection.code == "too_many_pixels"
    assert "decoded" in rejection.reason


def test_limits_must_be_positive() -> None:
    with pytest.raises(ValueError):
        Limits(max_bytes=0)
    with pytest.raises(ValueError):
        Limits(max_pixels=-1)


def test_pillow_never_pads_truncated_images(monkeypatch: pytest.MonkeyPatch) -> None:
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(RuntimeError, match="LOAD_TRUNCATED_IMAGES"):
        check_image(images.rgb_png())
