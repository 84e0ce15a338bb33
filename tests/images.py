"""Image fixtures as bytes, generated on the fly (numpy + Pillow + tifffile), for tests and benchmarks.

Every generator is deterministic: the same arguments give the same bytes, and a different ``seed`` gives
different content (so fixtures don't collide as duplicates when content hashes matter). The hostile
fixtures (bombs, truncated and corrupt files) are built byte by byte where no library would write them.
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import tifffile
from PIL import Image

from deploy.local.demo import digit_pngs

__all__ = [
    "animated_png",
    "bmp",
    "corrupt_png",
    "digits_images",
    "empty",
    "garbage",
    "gif",
    "gray16_png",
    "gray16_tiff",
    "gray_png",
    "jpeg",
    "jpeg_bomb",
    "large_tiff16",
    "multichannel_tiff",
    "multipage_tiff",
    "pillow_tiff",
    "png_bomb",
    "rgb_png",
    "text",
    "tiff_bomb",
    "truncated_jpeg",
    "truncated_png",
    "truncated_tiff",
    "write_imagefolder",
]

ImageItem = tuple[str, str, bytes]
"""(label, file name, encoded bytes): one file of an ImageFolder."""


def _pixels(shape: tuple[int, ...], dtype: str, seed: int) -> np.ndarray:
    """Noise over a gradient: compresses like a real photo would (not to nothing), differs per seed."""
    rng = np.random.default_rng(seed)
    info = np.iinfo(dtype)
    gradient = np.linspace(0, info.max // 2, num=shape[1], dtype=np.float64)
    gradient = gradient.reshape((1, shape[1]) + (1,) * (len(shape) - 2))
    noise = rng.integers(0, info.max // 2, size=shape, dtype=np.int64)
    return (gradient + noise).astype(dtype)


def _pillow(image: Image.Image, fmt: str, **params: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **params)
    return buf.getvalue()


def rgb_png(width: int = 32, height: int = 24, seed: int = 0) -> bytes:
    """An 8-bit RGB PNG."""
    return _pillow(Image.fromarray(_pixels((height, width, 3), "uint8", seed), "RGB"), "PNG")


def gray_png(width: int = 32, height: int = 24, seed: int = 0) -> bytes:
    """An 8-bit grayscale PNG."""
    return _pillow(Image.fromarray(_pixels((height, width), "uint8", seed), "L"), "PNG")


def gray16_png(width: int = 32, height: int = 24, seed: int = 0) -> bytes:
    """A 16-bit grayscale PNG."""
    return _pillow(Image.fromarray(_pixels((height, width), "uint16", seed)), "PNG")


def animated_png(width: int = 32, height: int = 24, frames: int = 3, seed: int = 0) -> bytes:
    """An 8-bit grayscale APNG of ``frames`` frames."""
    images = [Image.fromarray(_pixels((height, width), "uint8", seed + i), "L") for i in range(frames)]
    return _pillow(images[0], "PNG", save_all=True, append_images=images[1:])


def jpeg(width: int = 32, height: int = 24, seed: int = 0, *, gray: bool = False, **params: object) -> bytes:
    """An 8-bit JPEG (RGB, or grayscale with ``gray``); ``params`` go to Pillow (``progressive=True``)."""
    if gray:
        image = Image.fromarray(_pixels((height, width), "uint8", seed), "L")
    else:
        image = Image.fromarray(_pixels((height, width, 3), "uint8", seed), "RGB")
    return _pillow(image, "JPEG", quality=90, **params)


def _tiff(data: np.ndarray, **kwargs: Any) -> bytes:
    buf = io.BytesIO()
    tifffile.imwrite(buf, data, **kwargs)
    return buf.getvalue()


def gray16_tiff(width: int = 32, height: int = 24, seed: int = 0, *, compression: str | None = None) -> bytes:
    """A 16-bit grayscale TIFF, uncompressed or e.g. ``compression="zlib"``."""
    return _tiff(_pixels((height, width), "uint16", seed), photometric="minisblack", compression=compression)


def multichannel_tiff(
    width: int = 32, height: int = 24, channels: int = 5, seed: int = 0, *, dtype: str = "uint16"
) -> bytes:
    """One page with ``channels`` interleaved samples per pixel, as a multi-channel microscope writes it."""
    data = _pixels((height, width, channels), dtype, seed)
    photometric = "rgb" if channels == 3 else "minisblack"
    return _tiff(data, photometric=photometric, planarconfig="contig")


def multipage_tiff(
    width: int = 32, height: int = 24, pages: int = 4, seed: int = 0, *, dtype: str = "uint16"
) -> bytes:
    """A stack of ``pages`` grayscale pages (one IFD each), like a z-stack or time series."""
    return _tiff(_pixels((pages, height, width), dtype, seed), photometric="minisblack")


def pillow_tiff(width: int = 32, height: int = 24, seed: int = 0, *, compression: str = "tiff_lzw") -> bytes:
    """An 8-bit grayscale TIFF written by Pillow, e.g. LZW- or JPEG-compressed (codecs tifffile lacks
    without imagecodecs)."""
    image = Image.fromarray(_pixels((height, width), "uint8", seed), "L")
    return _pillow(image, "TIFF", compression=compression)


def large_tiff16(width: int = 10_000, height: int = 10_000) -> bytes:
    """An uncompressed 16-bit grayscale TIFF, ``2 * width * height`` bytes of pixels (200 MB by default).

    Built from an outer sum rather than random numbers: a few hundred milliseconds for 200 MB.
    """
    data = np.add.outer(np.arange(height, dtype=np.uint16), np.arange(width, dtype=np.uint16))
    return _tiff(data, photometric="minisblack")


def empty() -> bytes:
    """Zero bytes."""
    return b""


def garbage(size: int = 4096, seed: int = 0) -> bytes:
    """Random bytes that no image format recognises."""
    data = np.random.default_rng(seed).integers(0, 256, size=size, dtype=np.uint8).tobytes()
    # Make sure it starts with no signature, whatever the seed.
    return b"\x00junk" + data


def text() -> bytes:
    """A text file uploaded by mistake."""
    return b"label,file\n7,img_001.png\n"


def gif(width: int = 16, height: int = 16) -> bytes:
    """A GIF (a format Conveyor does not ingest)."""
    return _pillow(Image.fromarray(_pixels((height, width), "uint8", 0), "L"), "GIF")


def bmp(width: int = 16, height: int = 16) -> bytes:
    """A BMP (a format Conveyor does not ingest)."""
    return _pillow(Image.fromarray(_pixels((height, width, 3), "uint8", 0), "RGB"), "BMP")


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def corrupt_png() -> bytes:
    """A PNG with one byte of its image data flipped: the IDAT checksum no longer matches."""
    data = bytearray(rgb_png(64, 64))
    idat = data.index(b"IDAT")
    data[idat + 4 + 10] ^= 0xFF
    return bytes(data)


def truncated_png() -> bytes:
    """An RGB PNG cut in the middle of its image data."""
    data = rgb_png(64, 64)
    return data[: data.index(b"IDAT") + 200]


def truncated_jpeg() -> bytes:
    """A JPEG cut in the middle of its entropy-coded data."""
    data = jpeg(64, 64)
    return data[: len(data) * 2 // 3]


def truncated_tiff() -> bytes:
    """A 16-bit TIFF whose last pixel data is missing (the header still declares all of it)."""
    data = gray16_tiff(64, 64)
    # tifffile writes the IFD before the pixel data, so cutting the tail cuts pixels, not the header.
    return data[: len(data) - 1000]


def png_bomb(width: int = 100_000, height: int = 100_000) -> bytes:
    """A few hundred bytes that declare ``width x height`` 8-bit gray pixels (10 Gpx by default).

    The image data holds a few rows of zeros; a decoder that trusts the header allocates it all first.
    """
    rows = zlib.compress(b"\x00" * (width + 1) * 4, 9)
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", rows) + _chunk(b"IEND", b"")


def jpeg_bomb(width: int = 65_000, height: int = 65_000) -> bytes:
    """A small JPEG whose frame header is patched to declare ``width x height`` (4.2 Gpx by default)."""
    data = bytearray(jpeg(16, 16))
    for marker in (b"\xff\xc0", b"\xff\xc2"):  # baseline or progressive start of frame
        sof = data.find(marker)
        if sof >= 0:
            # marker, length (2), precision (1), height (2), width (2)
            struct.pack_into(">HH", data, sof + 5, height, width)
            return bytes(data)
    raise AssertionError("Pillow wrote a JPEG without a SOF0/SOF2 marker")


def tiff_bomb(width: int = 100_000, height: int = 100_000) -> bytes:
    """A tiny deflate-compressed TIFF that declares ``width x height`` 16-bit pixels (20 GB by default)."""
    strip = zlib.compress(b"\x00" * 1_000_000, 9)
    # Little-endian classic TIFF: header, one IFD at offset 8, then the strip.
    entries = [
        (256, 4, 1, width),  # ImageWidth, LONG
        (257, 4, 1, height),  # ImageLength
        (258, 3, 1, 16),  # BitsPerSample, SHORT
        (259, 3, 1, 8),  # Compression: deflate
        (262, 3, 1, 1),  # PhotometricInterpretation: min-is-black
        (273, 4, 1, 0),  # StripOffsets (filled in below)
        (277, 3, 1, 1),  # SamplesPerPixel
        (278, 4, 1, height),  # RowsPerStrip: one strip
        (279, 4, 1, len(strip)),  # StripByteCounts
    ]
    ifd_size = 2 + 12 * len(entries) + 4
    strip_offset = 8 + ifd_size
    ifd = struct.pack("<H", len(entries))
    for tag, kind, count, value in entries:
        value = strip_offset if tag == 273 else value
        packed = struct.pack("<HH", value, 0) if kind == 3 else struct.pack("<I", value)
        ifd += struct.pack("<HHI", tag, kind, count) + packed
    ifd += struct.pack("<I", 0)  # no next IFD
    return b"II*\x00" + struct.pack("<I", 8) + ifd + strip


@lru_cache(maxsize=1)
def _digits() -> tuple[ImageItem, ...]:
    return tuple(digit_pngs())  # the same images `make demo` uploads


def digits_images(n: int | None = None) -> list[ImageItem]:
    """scikit-learn's digits (1,797 images shipped with the package) as 32x32 8-bit PNGs.

    Returns ``(label, file name, png bytes)`` with labels ``"0"`` to ``"9"``; ``n`` takes the first n.
    """
    items = _digits()
    return list(items if n is None else items[:n])


def write_imagefolder(root: Path, items: Iterable[ImageItem]) -> list[Path]:
    """Write ``items`` as an ImageFolder, ``<root>/<label>/<file>``, and return the paths written."""
    paths = []
    for label, filename, data in items:
        path = root / label / filename
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        paths.append(path)
    return paths
