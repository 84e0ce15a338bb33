"""Validation of uploaded objects: is the key an ImageFolder path, and is the file an image we can train on?

Pure domain code: no broker, no S3. ``parse_key`` checks an object key against the layout
``<dataset>/<label>/<file>``; ``check_image`` decodes a file fully within byte and pixel limits. Both return
a ``Rejection`` (a reason code of ``dataset.rejected`` and a sentence an operator can act on) rather than
raising, so one bad file never stops a batch.

Decompression bombs are refused from the header, before any pixel buffer is allocated: the declared size is
checked against ``Limits.max_pixels`` first, and only then is the image decoded.
"""

from __future__ import annotations

import io
import struct
import unicodedata
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Literal, get_args

import tifffile
from PIL import Image, ImageFile, JpegImagePlugin, PngImagePlugin, TiffImagePlugin

from contracts.names import validate_name

__all__ = [
    "DEFAULT_LIMITS",
    "MAX_TIFF_PAGES",
    "REASON_CODES",
    "ImageInfo",
    "Limits",
    "ObjectPath",
    "ReasonCode",
    "Rejection",
    "check_image",
    "dataset_of_key",
    "parse_key",
]

ReasonCode = Literal[
    "bad_key",
    "bad_layout",
    "bad_name",
    "empty",
    "too_large",
    "too_many_pixels",
    "undecodable",
    "unsupported_format",
]
REASON_CODES: tuple[ReasonCode, ...] = get_args(ReasonCode)
"""The ``reason_code`` values of ``dataset.rejected``."""

# A page count bounds the work of reading TIFF headers: a file of a million one-pixel IFDs passes any pixel
# limit but would take minutes to walk. Real stacks (z, time, channels) stay far below this.
MAX_TIFF_PAGES = 100_000

# Decoded bytes allowed per allowed pixel: RGBA at 16 bits. It bounds the memory of a TIFF that declares few
# pixels but thousands of samples per pixel (or 64-bit samples), which a pixel count alone would let through.
_MAX_DECODED_BYTES_PER_PIXEL = 8

# S3 keys are at most 1024 bytes; a file name becomes a file in the dataset directory (255 bytes on most
# file systems).
_MAX_KEY_BYTES = 1024
_MAX_FILENAME_BYTES = 255

# Bidirectional overrides and isolates reorder how a key is displayed (a "trojan source" file name), and
# line/paragraph separators break log lines: refused like control characters.
_INVISIBLE = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u2028\u2029")
_PARTIAL_SUFFIXES = (".part", ".partial", ".tmp", ".crdownload", ".download", "~")


# ---- results -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rejection:
    """Why a file is quarantined: a ``dataset.rejected`` reason code and a sentence an operator can act on."""

    code: ReasonCode
    reason: str


@dataclass(frozen=True)
class ObjectPath:
    """A valid object key ``<dataset>/<label>/<file>``."""

    dataset: str
    label: str
    filename: str

    @property
    def path(self) -> str:
        """The path inside the dataset directory: ``<label>/<file>``."""
        return f"{self.label}/{self.filename}"

    @property
    def key(self) -> str:
        """The object key this was parsed from."""
        return f"{self.dataset}/{self.path}"


@dataclass(frozen=True)
class Limits:
    """What one file may weigh: ``max_bytes`` on disk, ``max_pixels`` declared (width x height, summed over
    the pages of a multi-page TIFF). Set by ``CONVEYOR_INGEST_MAX_BYTES`` and ``CONVEYOR_INGEST_MAX_PIXELS``.

    The defaults admit a 200 MB 16-bit TIFF (10,000 x 10,000 = 100 Mpx) with room to spare, and refuse
    decompression bombs that declare billions of pixels.
    """

    max_bytes: int = 500_000_000
    max_pixels: int = 250_000_000

    def __post_init__(self) -> None:
        if self.max_bytes < 1 or self.max_pixels < 1:
            raise ValueError(f"limits must be positive, got {self}")


DEFAULT_LIMITS = Limits()


@dataclass(frozen=True)
class ImageInfo:
    """What a fully decoded image is.

    ``width`` and ``height`` are those of the first page; ``channels`` are the samples per pixel as stored (a
    palette PNG has 1); ``dtype`` is the numpy name of the stored sample type and ``bits`` its bit depth (a
    1-bit PNG is ``uint8`` with ``bits=1``); ``pixels`` is width x height summed over all pages (the number
    checked against ``Limits.max_pixels``).
    """

    format: Literal["PNG", "JPEG", "TIFF"]
    width: int
    height: int
    channels: int
    pages: int
    dtype: str
    bits: int
    pixels: int


# ---- keys ----------------------------------------------------------------------------------------------


def parse_key(key: str) -> ObjectPath | Rejection:
    """Check an (already URL-decoded) object key against the layout ``<dataset>/<label>/<file>``.

    Dataset and label must follow the name rule; keys that could escape the dataset directory (``..``,
    leading ``/``, ``//``, backslashes), that carry control characters or that were not valid UTF-8 (U+FFFD,
    surrogates) are refused, and so are hidden files and partial uploads (``.DS_Store``, ``*.part``).
    """
    if (rejection := _check_key_text(key)) is not None:
        return rejection
    parts = key.split("/")
    if any(part in (".", "..") for part in parts):
        return _bad_key(key, "has a '.' or '..' segment, which could point outside its dataset folder")
    if key.endswith("/"):
        return Rejection(
            "bad_layout",
            f"key {key!r} ends with '/': it is a folder marker, not a file; upload files as "
            "<dataset>/<label>/<file>",
        )
    if "" in parts:
        return _bad_key(key, "has an empty segment ('//'); write <dataset>/<label>/<file> with single '/'")
    if len(parts) != 3:
        return Rejection(
            "bad_layout",
            f"key {key!r} has {len(parts)} segment{'s' if len(parts) != 1 else ''}; expected "
            "<dataset>/<label>/<file>, e.g. digits/7/img-001.png",
        )
    dataset, label, filename = parts
    for what, name in (("dataset", dataset), ("label", label)):
        try:
            validate_name(name)
        except ValueError as exc:
            return Rejection("bad_name", f"key {key!r}: the {what} folder is not a valid name: {exc}")
    if (rejection := _check_filename(key, filename)) is not None:
        return rejection
    return ObjectPath(dataset, label, filename)


def dataset_of_key(key: str) -> str:
    """The dataset a key belongs to, or ``unknown`` when its first segment is no valid name.

    ``dataset.rejected`` is published under this name, also for keys that ``parse_key`` refuses.
    """
    first = key.split("/", 1)[0] if isinstance(key, str) else ""
    try:
        return validate_name(first)
    except ValueError:
        return "unknown"


def _bad_key(key: str, why: str) -> Rejection:
    return Rejection("bad_key", f"key {key!r} {why}")


def _check_key_text(key: str) -> Rejection | None:
    if not isinstance(key, str) or not key:
        return Rejection("bad_key", "the key is empty")
    try:
        size = len(key.encode("utf-8"))
    except UnicodeEncodeError:
        # Lone surrogates: what Python makes of undecodable bytes with errors="surrogateescape".
        return _bad_key(key, "is not valid UTF-8 (it holds unpaired surrogates); rename the file in UTF-8")
    if "\ufffd" in key:
        return _bad_key(
            key,
            "contains U+FFFD, the replacement character: its bytes were not valid UTF-8 where they were "
            "decoded; rename the file in UTF-8",
        )
    if size > _MAX_KEY_BYTES:
        return _bad_key(key[:64] + "...", f"is {size} bytes long; S3 keys hold at most {_MAX_KEY_BYTES}")
    for index, char in enumerate(key):
        if char in _INVISIBLE or unicodedata.category(char) == "Cc":
            return _bad_key(
                key, f"contains the control character U+{ord(char):04X} at position {index}; rename the file"
            )
    if "\\" in key:
        return _bad_key(key, "contains a backslash; use '/' between <dataset>/<label>/<file>")
    if key.startswith("/"):
        return _bad_key(key, "is an absolute path (starts with '/'); write <dataset>/<label>/<file>")
    return None


def _check_filename(key: str, filename: str) -> Rejection | None:
    if filename.startswith("."):
        return _bad_key(
            key,
            "is a hidden file (its name starts with '.', like .DS_Store or ._img.png written by macOS), "
            "not an image; delete it from the bucket",
        )
    if filename.lower().endswith(_PARTIAL_SUFFIXES) or filename.startswith("~$"):
        return _bad_key(
            key, "looks like a partial or temporary upload; upload the finished file under its final name"
        )
    if len(filename.encode("utf-8")) > _MAX_FILENAME_BYTES:
        return _bad_key(key, f"has a file name longer than {_MAX_FILENAME_BYTES} bytes; shorten it")
    return None


# ---- images --------------------------------------------------------------------------------------------


def check_image(data: bytes | Path, limits: Limits = DEFAULT_LIMITS) -> ImageInfo | Rejection:
    """Decode a PNG, JPEG or TIFF file fully and return what it is, or why it is refused.

    ``data`` is the file's content or its path. The byte limit is checked first, then the format from the
    file's signature, then the size declared in the header against ``limits.max_pixels``, and only then are
    the pixels decoded, so a decompression bomb is refused without allocating anything. TIFFs are read with
    tifffile (16-bit, multi-channel, multi-page), or Pillow for codecs tifffile lacks (LZW, JPEG).
    """
    # Pillow would pad a truncated image with gray and call it fine: validation is void if someone set it.
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise RuntimeError(
            "PIL.ImageFile.LOAD_TRUNCATED_IMAGES is set: truncated images would pass validation"
        )
    if isinstance(data, Path):
        size = data.stat().st_size
        with data.open("rb") as f:
            head = f.read(_HEAD_BYTES)
    else:
        size = len(data)
        head = bytes(data[:_HEAD_BYTES])
    if size == 0:
        return Rejection("empty", "the file is empty (0 bytes); upload it again")
    if size > limits.max_bytes:
        return Rejection(
            "too_large",
            f"the file is {_si(size, 'B')} ({size:,} bytes), over the limit of {_si(limits.max_bytes, 'B')} "
            "(CONVEYOR_INGEST_MAX_BYTES)",
        )
    fmt = _sniff(head)
    if fmt not in ("PNG", "JPEG", "TIFF"):
        return Rejection(
            "unsupported_format",
            f"the file is {fmt}, not PNG, JPEG or TIFF; convert it (for example to PNG) before uploading",
        )
    try:
        if fmt == "TIFF":
            return _check_tiff(data, head, size, limits)
        content = data.read_bytes() if isinstance(data, Path) else data
        return _check_png(content, limits) if fmt == "PNG" else _check_jpeg(content, limits)
    except MemoryError:
        raise  # the machine's trouble, not the file's: let the caller retry
    except Image.DecompressionBombError as exc:
        return Rejection("too_many_pixels", f"Pillow refuses to decode it: {exc}")
    except Exception as exc:
        # Decoders signal bad data with many exception types (OSError, SyntaxError, ValueError, zlib.error,
        # struct.error, tifffile's errors...): each means "this file cannot be read", never "stop the batch".
        return _undecodable(
            fmt,
            f"the decoder says {type(exc).__name__}: {exc}; it is probably truncated or corrupt, "
            "upload it again",
        )


_HEAD_BYTES = 64

_SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"II+\x00", "TIFF"),  # BigTIFF
    (b"MM\x00+", "TIFF"),
    (b"GIF87a", "a GIF image"),
    (b"GIF89a", "a GIF image"),
    (b"BM", "a BMP image"),
    (b"\x00\x00\x00\x0cjP  \r\n\x87\n", "a JPEG 2000 image"),
    (b"\xff\x4f\xff\x51", "a JPEG 2000 codestream"),
    (b"\xff\x0a", "a JPEG XL image"),
    (b"\x00\x00\x00\x0cJXL \r\n\x87\n", "a JPEG XL image"),
    (b"8BPS", "a Photoshop document"),
    (b"%PDF", "a PDF document"),
    (b"PK\x03\x04", "a ZIP archive"),
    (b"\x1f\x8b", "a gzip archive"),
    (b"\x93NUMPY", "a NumPy array"),
    (b"\x89HDF\r\n\x1a\n", "an HDF5 file"),
)


def _sniff(head: bytes) -> str:
    """The format by its signature: PNG, JPEG or TIFF, else a phrase naming what it is."""
    for signature, fmt in _SIGNATURES:
        if head.startswith(signature):
            return fmt
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "a WebP image"
    if head[4:8] == b"ftyp":
        return f"an ISO media file ({head[8:12].decode('ascii', 'replace').strip()}: HEIC, AVIF or video)"
    try:
        # Cut at a character boundary may leave a partial sequence at the end: ignore only that.
        decoded = head.decode("utf-8", errors="strict" if len(head) < _HEAD_BYTES else "ignore")
    except UnicodeDecodeError:
        decoded = ""
    if decoded and all(c.isprintable() or c in "\t\r\n" for c in decoded):
        return "text"
    return f"of an unknown format (it starts with {head[:8].hex(' ')})"


def _undecodable(fmt: str, why: str) -> Rejection:
    return Rejection("undecodable", f"the {fmt} file cannot be decoded: {why}")


def _too_many_pixels(what: str, pixels: int, limits: Limits) -> Rejection:
    return Rejection(
        "too_many_pixels",
        f"{what} = {_si(pixels, 'px')}, over the limit of {_si(limits.max_pixels, 'px')} "
        "(CONVEYOR_INGEST_MAX_PIXELS); a decompression bomb, or an image to split into tiles before upload",
    )


def _si(value: int, unit: str) -> str:
    """``1_600_000_000, "px"`` -> ``"1.6 Gpx"``: sizes as an operator reads them."""
    scaled = float(value)
    for prefix in ("", "k", "M", "G", "T", "P"):
        text = f"{scaled:.3g}"
        if float(text) < 1000 or prefix == "P":
            return f"{text} {prefix}{unit}"
        scaled /= 1000
    raise AssertionError("unreachable")


# ---- PNG -----------------------------------------------------------------------------------------------


def _check_png(data: bytes, limits: Limits) -> ImageInfo | Rejection:
    view = memoryview(data)
    if len(view) < 33 or view[12:16] != b"IHDR":
        return _undecodable("PNG", "it has no IHDR header chunk")
    width, height, bits = struct.unpack_from(">IIB", view, 16)
    if width == 0 or height == 0:
        return _undecodable("PNG", f"it declares {width}x{height} pixels")
    if width * height > limits.max_pixels:
        return _too_many_pixels(f"the PNG declares {width}x{height}", width * height, limits)
    chunks = _png_chunks(view)
    if isinstance(chunks, Rejection):
        return chunks
    frames = chunks
    if width * height * frames > limits.max_pixels:
        return _too_many_pixels(
            f"the animated PNG declares {frames} frames of {width}x{height}", width * height * frames, limits
        )
    image = PngImagePlugin.PngImageFile(io.BytesIO(data))
    with image:
        _load_frames(image)
        channels = len(image.getbands())
    return ImageInfo(
        format="PNG",
        width=width,
        height=height,
        channels=channels,
        pages=frames,
        dtype="uint16" if bits == 16 else "uint8",
        bits=bits,
        pixels=width * height * frames,
    )


def _png_chunks(view: memoryview) -> int | Rejection:
    """Walk the chunks: every length within the file, every CRC right, an IEND at the end.

    Pillow skips the CRCs of image data when it decodes, and a flipped bit can still inflate; the CRCs
    catch that. Returns the frame count (``acTL`` of an animated PNG, else 1).
    """
    size = len(view)
    pos = 8
    frames = 1
    while pos + 12 <= size:
        length = int.from_bytes(view[pos : pos + 4], "big")
        kind = bytes(view[pos + 4 : pos + 8])
        end = pos + 12 + length
        if end > size:
            return _undecodable(
                "PNG",
                f"chunk {kind.decode('latin-1')!r} at byte {pos} needs {length:,} bytes but the file ends at "
                f"byte {size:,}: the file is truncated, upload it again",
            )
        expected = int.from_bytes(view[end - 4 : end], "big")
        if zlib.crc32(view[pos + 4 : end - 4]) != expected:
            return _undecodable(
                "PNG",
                f"chunk {kind.decode('latin-1')!r} at byte {pos} fails its CRC check: the file is corrupt, "
                "upload it again",
            )
        if kind == b"acTL" and length >= 4:
            frames = max(1, int.from_bytes(view[pos + 8 : pos + 12], "big"))
        if kind == b"IEND":
            return frames
        pos = end
    return _undecodable(
        "PNG", f"it ends at byte {size:,} before its IEND chunk: the file is truncated, upload it again"
    )


def _load_frames(image: Image.Image) -> None:
    """Decode every frame; ``load`` raises on truncated or corrupt data (LOAD_TRUNCATED_IMAGES is False)."""
    for frame in range(getattr(image, "n_frames", 1)):
        image.seek(frame)
        image.load()


# ---- JPEG ----------------------------------------------------------------------------------------------


def _check_jpeg(data: bytes, limits: Limits) -> ImageInfo | Rejection:
    # The plugin class, not Image.open: it parses the header only, and Image.open would apply Pillow's own
    # global bomb limit (179 Mpx) instead of ours.
    image = JpegImagePlugin.JpegImageFile(io.BytesIO(data))
    with image:
        width, height = image.size
        if width * height > limits.max_pixels:
            return _too_many_pixels(f"the JPEG declares {width}x{height}", width * height, limits)
        image.load()
        channels = len(image.getbands())
        bits = int(getattr(image, "bits", 8))
    return ImageInfo(
        format="JPEG",
        width=width,
        height=height,
        channels=channels,
        pages=1,
        dtype="uint8",
        bits=bits,
        pixels=width * height,
    )


# ---- TIFF ----------------------------------------------------------------------------------------------


def _check_tiff(data: bytes | Path, head: bytes, size: int, limits: Limits) -> ImageInfo | Rejection:
    source: Path | IO[bytes] = data if isinstance(data, Path) else io.BytesIO(data)
    with tifffile.TiffFile(source) as tif:
        # Page objects hold every tag: don't keep thousands of them while walking a long stack twice.
        tif.pages.cache = False
        # First pass: headers only, so that a stack over the limits is refused before any pixel is decoded.
        first: tifffile.TiffPage | None = None
        count = pixels = 0
        native = True
        for index, page in enumerate(tif.pages):
            if index >= MAX_TIFF_PAGES:
                return Rejection(
                    "too_many_pixels",
                    f"the TIFF has more than {MAX_TIFF_PAGES:,} pages; split the stack into smaller files",
                )
            assert isinstance(page, tifffile.TiffPage)  # tifffile yields TiffFrames only when asked to
            rejection = _check_tiff_page(index, page, size, limits)
            if rejection is not None:
                return rejection
            pixels += page.imagewidth * page.imagelength * page.imagedepth
            if pixels > limits.max_pixels:
                return Rejection(
                    "too_many_pixels",
                    f"the TIFF's first {index + 1} pages declare {_si(pixels, 'px')} in total, over the "
                    f"limit of {_si(limits.max_pixels, 'px')} (CONVEYOR_INGEST_MAX_PIXELS); split the stack "
                    "into smaller files",
                )
            native = native and page.compression in tifffile.TIFF.DECOMPRESSORS
            if first is None:
                first = page
            count = index + 1
        if first is None:
            offset = _first_ifd_offset(head)
            if offset >= size:
                return _undecodable(
                    "TIFF",
                    f"its header points to an image directory at byte {offset:,} but the file ends at byte "
                    f"{size:,}: the file is truncated, upload it again",
                )
            return _undecodable("TIFF", "it has no readable image directory")
        # Second pass: decode. One page at a time, so memory stays at the largest page, not the whole stack;
        # one thread, since ingest validates many files side by side.
        if native:
            for page in tif.pages:
                page.asarray(maxworkers=1)
        else:
            _decode_tiff_with_pillow(data)
        return ImageInfo(
            format="TIFF",
            width=first.imagewidth,
            height=first.imagelength,
            channels=first.samplesperpixel,
            pages=count,
            dtype=str(first.dtype),
            bits=first.bitspersample,
            pixels=pixels,
        )


def _first_ifd_offset(head: bytes) -> int:
    """The offset of the first IFD, from the 8-byte (classic) or 16-byte (BigTIFF) header."""
    order: Literal["little", "big"] = "little" if head[:2] == b"II" else "big"
    if head[2:4] in (b"+\x00", b"\x00+"):
        return int.from_bytes(head[8:16], order)
    return int.from_bytes(head[4:8], order)


def _check_tiff_page(index: int, page: tifffile.TiffPage, size: int, limits: Limits) -> Rejection | None:
    """Check one page's header: declared size, decoded size, sample type, data within the file."""
    width, height, depth = page.imagewidth, page.imagelength, page.imagedepth
    declared = width * height * depth
    where = f"page {index + 1}" if index else "the TIFF"
    if declared > limits.max_pixels:
        shape = f"{width}x{height}" + (f"x{depth}" if depth > 1 else "")
        return _too_many_pixels(f"{where} declares {shape}", declared, limits)
    if declared == 0:
        return _undecodable("TIFF", f"{where} declares {width}x{height} pixels")
    if page.dtype is None:
        return _undecodable(
            "TIFF", f"{where} has {page.bitspersample}-bit samples of format {page.sampleformat}, unsupported"
        )
    if page.nbytes > limits.max_pixels * _MAX_DECODED_BYTES_PER_PIXEL:
        return Rejection(
            "too_many_pixels",
            f"{where} declares {width}x{height} with {page.samplesperpixel} samples of {page.dtype}, "
            f"{_si(page.nbytes, 'B')} decoded, over the {_si(limits.max_pixels * 8, 'B')} that "
            "CONVEYOR_INGEST_MAX_PIXELS allows (8 bytes per pixel)",
        )
    for offset, count in zip(page.dataoffsets, page.databytecounts, strict=False):
        if offset + count > size:
            return _undecodable(
                "TIFF",
                f"{where} has image data up to byte {offset + count:,} but the file ends at byte {size:,}: "
                "the file is truncated, upload it again",
            )
    return None


def _decode_tiff_with_pillow(data: bytes | Path) -> None:
    """Decode every page with Pillow's libtiff, for compressions tifffile reads only with imagecodecs."""
    source: Path | IO[bytes] = data if isinstance(data, Path) else io.BytesIO(data)
    image = TiffImagePlugin.TiffImageFile(source)
    with image:
        _load_frames(image)
