"""Image preprocessing shared by the trainer and the serving gateway: training and serving cannot drift apart.

numpy and Pillow only (tifffile, imported when a TIFF arrives), never torch: the gateway imports this module.

The pipeline, and the function for each step::

    bytes | Path --decode-->    H x W x C float32 in [0, 1]       (the image's own size and channels)
                 --prepare-->   S x S x channels float32 in [0, 1]  (channel rules, then resize to spec.size)
                 --normalise--> channels x S x S float32            ((x - mean) / std per channel)

``decode_samples`` is ``decode`` that leaves an 8-bit PNG or JPEG's samples as they are (uint8, which
``decode`` divides by 255): where they are already ``S x S x channels``, ``prepare`` would only scale them, so
the gateway sends them to a Python-backend model as bytes and the model divides and normalises them itself,
with the same float32 operations (``normalise_pixels``; the Triton ``model.py`` does it on the device).

``preprocess`` is ``normalise(prepare(image))``; ``preprocess_batch`` writes N of them into one contiguous
N x C x S x S array, the TorchScript's ``image`` input. ``fit_spec`` computes the per-channel mean and std on
prepared training images (the trainer fits it on the train split only) and ``image_stats`` summarises a
prepared image for the monitor's drift tests.

Decoding (``decode``)
    PNG and JPEG by Pillow, TIFF by tifffile (Pillow for compressions tifffile cannot read without
    imagecodecs, such as LZW and JPEG). Samples become float32 in [0, 1]: 8-bit / 255, 16-bit / 65535, other
    unsigned integers by the largest value their bit depth holds (a TIFF's declared BitsPerSample: 12-bit data
    / 4095), signed integers by their type's maximum (negative values clip to 0), floats as they are, clipped
    to [0, 1] (NaN -> 0). Bilevel images are 0 or 1. Alpha is dropped (RGBA -> RGB, LA -> L, no
    compositing); palette images become RGB; CMYK, YCbCr and the other Pillow colour modes become RGB;
    MinIsWhite TIFFs are inverted. The EXIF orientation of a JPEG or PNG is applied (the image as a person
    sees it). An animated PNG gives its first frame. A TIFF gives its first series (the main image, not
    thumbnails or pyramid levels): with ``pages="all"`` every page (z, time, channel planes...) becomes
    channels, page-major then samples-per-pixel; with ``pages="first"`` only the first page. Input that
    cannot be decoded raises ``ImageDecodeError`` (a ``ValueError``: the gateway answers 422).

Channel rules (``prepare``), by channel count only, for an input of ``c`` channels and a spec of ``C``:
    - ``c == C``: unchanged.
    - ``C == 1`` and ``c == 3``: luminance, ITU-R BT.601 ``0.299 R + 0.587 G + 0.114 B`` (Pillow's "L").
    - otherwise ``c > C``: the first ``C`` channels (a 5-channel stack -> its first 3; RGB -> R, G for C=2).
    - ``c < C``: repeated cyclically, output channel ``i`` is input channel ``i % c`` (gray -> RGB repeats the
      gray; RGB -> 5 channels is R, G, B, R, G).
    - A multi-page TIFF given as bytes or a Path: its pages are channels when ``C > 1``, and only its first
      page is read when ``C == 1`` (then the rules above apply to that page's samples). An array has lost its
      pages: a 3-page stack decoded with ``pages="all"`` is treated as RGB. Pass bytes or Paths (or
      ``decode(data, pages=pages_for(spec))``) to keep the page rule.

Resize (``prepare``)
    The whole image is stretched to ``size x size`` (the aspect ratio is not kept, nothing is cropped) with a
    bilinear (triangle) filter that widens with the scale factor when shrinking, so a large image is averaged
    rather than aliased: the same weights as Pillow's ``Image.resize(..., Image.BILINEAR)`` on float images
    (pixel centres at ``i + 0.5``, edges clamped), applied as two matrix products in float32. An image already
    ``size x size`` is not resampled at all.

Image statistics (``image_stats``)
    On the gray image (the mean over channels) of an image in [0, 1], before normalisation: ``mean``, ``std``,
    ``contrast`` = 98th minus 2nd percentile (robust to a few extreme pixels; 0 for a flat image, at most 1)
    and ``sharpness`` = variance of the 4-neighbour Laplacian over interior pixels (0 for images under 3x3).
    The trainer's reference profile and the gateway both compute them on ``prepare``'s output, so the
    statistics describe what the model sees, at one resolution, whatever size the uploads have.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal, TypeAlias

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageOps, JpegImagePlugin, PngImagePlugin, TiffImagePlugin

if TYPE_CHECKING:
    import tifffile

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "LUMA_WEIGHTS",
    "ImageDecodeError",
    "ImageInput",
    "ImageTooLarge",
    "Pages",
    "PreprocessSpec",
    "UnsupportedImageFormat",
    "as_float_image",
    "decode",
    "decode_samples",
    "fit_spec",
    "image_stats",
    "normalise",
    "normalise_pixels",
    "pages_for",
    "prepare",
    "preprocess",
    "preprocess_batch",
]

FloatArray: TypeAlias = npt.NDArray[np.float32]
ImageInput: TypeAlias = np.ndarray[Any, Any] | bytes | bytearray | memoryview | Path
"""What ``prepare``/``preprocess`` take: an H x W (x C) array, or an encoded file's bytes or path."""
Pages = Literal["all", "first"]
"""Which pages of a multi-page TIFF ``decode`` reads: all of them as channels, or the first."""

DEFAULT_MAX_PIXELS = 250_000_000
"""The default for ``max_pixels``: ingest's default limit (``CONVEYOR_INGEST_MAX_PIXELS``)."""

LUMA_WEIGHTS = (0.299, 0.587, 0.114)
"""RGB -> gray, ITU-R BT.601 (what Pillow's ``convert("L")`` uses)."""

_MIN_STD = 1e-6  # a fitted std below this is a constant channel: it is centred, not scaled (std 1)
_MAX_SAMPLES_PER_PIXEL = 4  # decoded samples allowed per allowed pixel (RGBA), over all channels


# ---- errors --------------------------------------------------------------------------------------------


class ImageDecodeError(ValueError):
    """The input is not an image this module can decode (the gateway answers 422 with the message)."""


class UnsupportedImageFormat(ImageDecodeError):
    """The input is not PNG, JPEG or TIFF (a gateway may answer 415)."""


class ImageTooLarge(ImageDecodeError):
    """The image declares more pixels than ``max_pixels``; refused before any pixel is decoded (413)."""


# ---- the spec ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PreprocessSpec:
    """How an image becomes the model's input: ``size x size``, ``channels`` channels, normalised per channel.

    ``mean`` and ``std`` (one per channel) apply to samples already scaled to [0, 1]: ``(x - mean) / std``.
    ``interpolation`` is recorded for readers of the serving spec; bilinear is the one filter (see the module
    docstring). ``to_dict``/``from_dict`` give its JSON form, stored with the model.
    """

    FORMAT: ClassVar[int] = 1
    """The version of these preprocessing rules; ``from_dict`` refuses a spec written under other rules."""

    size: int
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: Literal["bilinear"] = "bilinear"

    def __post_init__(self) -> None:
        for name in ("size", "channels"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
                raise ValueError(f"PreprocessSpec.{name} must be a positive integer, got {value!r}")
            object.__setattr__(self, name, int(value))
        for name in ("mean", "std"):
            values = getattr(self, name)
            if isinstance(values, str | bytes) or not isinstance(values, Iterable):
                raise ValueError(f"PreprocessSpec.{name} must be a sequence of numbers, got {values!r}")
            try:
                floats = tuple(float(v) for v in values)
            except (TypeError, ValueError):
                raise ValueError(f"PreprocessSpec.{name} must be numbers, got {values!r}") from None
            if len(floats) != self.channels:
                raise ValueError(
                    f"PreprocessSpec.{name} has {len(floats)} values for {self.channels} channel(s)"
                )
            if not all(math.isfinite(v) for v in floats):
                raise ValueError(f"PreprocessSpec.{name} must be finite, got {floats}")
            object.__setattr__(self, name, floats)
        if any(v <= 0 for v in self.std):
            raise ValueError(f"PreprocessSpec.std must be positive, got {self.std}")
        if self.interpolation != "bilinear":
            raise ValueError(f"PreprocessSpec.interpolation must be 'bilinear', got {self.interpolation!r}")

    @classmethod
    def identity(cls, size: int, channels: int) -> PreprocessSpec:
        """Resize and channel rules only: mean 0 and std 1, so the output stays in [0, 1]."""
        return cls(size=size, channels=channels, mean=(0.0,) * channels, std=(1.0,) * channels)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form: ``{"format", "size", "channels", "mean", "std", "interpolation"}``."""
        return {
            "format": self.FORMAT,
            "size": self.size,
            "channels": self.channels,
            "mean": list(self.mean),
            "std": list(self.std),
            "interpolation": self.interpolation,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PreprocessSpec:
        """Read ``to_dict``'s form back; unknown keys and another ``format`` are refused (``ValueError``)."""
        if not isinstance(data, Mapping):
            raise ValueError(f"a preprocessing spec must be a JSON object, got {type(data).__name__}")
        fmt = data.get("format", cls.FORMAT)
        if fmt != cls.FORMAT:
            raise ValueError(
                f"the preprocessing spec has format {fmt!r}; this Conveyor reads format {cls.FORMAT} only "
                "(was the model trained by another version?)"
            )
        known = {"format", "size", "channels", "mean", "std", "interpolation"}
        if unknown := sorted(set(data) - known):
            raise ValueError(f"the preprocessing spec has unknown keys {unknown}; known are {sorted(known)}")
        if missing := sorted({"size", "channels", "mean", "std"} - set(data)):
            raise ValueError(f"the preprocessing spec lacks {missing}")
        return cls(
            size=data["size"],
            channels=data["channels"],
            mean=data["mean"],
            std=data["std"],
            interpolation=data.get("interpolation", "bilinear"),
        )


def pages_for(spec: PreprocessSpec) -> Pages:
    """The pages of a multi-page TIFF that ``spec`` uses: all of them (as channels) when it wants more than
    one channel, else the first."""
    return "first" if spec.channels == 1 else "all"


# ---- decoding ------------------------------------------------------------------------------------------


def decode(
    data: bytes | bytearray | memoryview | Path,
    *,
    pages: Pages = "all",
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> FloatArray:
    """Decode a PNG, JPEG or TIFF file (its bytes or its path) to H x W x C float32 in [0, 1].

    See the module docstring for the scaling and colour rules. ``pages`` chooses what a multi-page TIFF gives:
    every page as channels, or the first page. ``max_pixels`` bounds width x height (x pages read) from the
    header, before any pixel is decoded (``ImageTooLarge``). Raises ``ImageDecodeError`` (a ``ValueError``)
    for anything that is not a decodable image; a missing file raises ``FileNotFoundError``.
    """
    samples = decode_samples(data, pages=pages, max_pixels=max_pixels)
    return _scaled(samples)


def decode_samples(
    data: bytes | bytearray | memoryview | Path,
    *,
    pages: Pages = "all",
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> np.ndarray[Any, Any]:
    """``decode``, except that an 8-bit PNG or JPEG comes back as its samples, H x W x C uint8 (``decode``
    divides them by 255: ``as_float_image`` of them is ``decode``'s result). Every other image is ``decode``'s
    float32 in [0, 1]."""
    if isinstance(data, Path):
        content = data.read_bytes()
    elif isinstance(data, bytes | bytearray | memoryview):
        content = bytes(data)
    else:
        raise TypeError(f"decode takes bytes or a pathlib.Path, got {type(data).__name__}")
    if pages not in ("all", "first"):
        raise ValueError(f"pages must be 'all' or 'first', got {pages!r}")
    if not content:
        raise ImageDecodeError("the image is empty (0 bytes)")
    fmt = _sniff(content[:16])
    try:
        if fmt == "TIFF":
            return _decode_tiff(content, pages, max_pixels)
        return _decode_pillow(content, fmt, max_pixels)
    except (ImageDecodeError, MemoryError):
        raise
    except Exception as exc:
        # Decoders signal bad data with many exception types (OSError, SyntaxError, zlib.error, struct.error,
        # tifffile's errors...): each means "this input cannot be read".
        raise ImageDecodeError(
            f"the {fmt} image cannot be decoded ({type(exc).__name__}: {exc}); it is probably truncated or "
            "corrupt"
        ) from exc


def as_float_image(image: np.ndarray[Any, Any]) -> FloatArray:
    """An H x W or H x W x C array as H x W x C float32 in [0, 1], scaled like ``decode`` scales samples.

    uint8 / 255, uint16 / 65535, other integers by their type's maximum (negatives clip to 0), bool as 0/1,
    floats clipped to [0, 1] (NaN -> 0). A float32 H x W x C array already in [0, 1] is returned as is.
    """
    if not isinstance(image, np.ndarray):
        raise TypeError(f"expected a numpy array, got {type(image).__name__}")
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or 0 in image.shape:
        raise ValueError(f"an image array must be H x W or H x W x C with no empty axis, got {image.shape}")
    if image.dtype == np.float32 and image.size and 0.0 <= image.min() and image.max() <= 1.0:
        return image
    return _to_unit(image, None)


def _sniff(head: bytes) -> str:
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "TIFF"
    what = f"of an unknown format (it starts with {head[:8].hex(' ')})"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        what = "a WebP image"
    elif head.isascii() and all(c.isprintable() or c in "\t\r\n" for c in head.decode("ascii")):
        what = "text"
    for signature, name in _OTHER_FORMATS:
        if head.startswith(signature):
            what = name
            break
    raise UnsupportedImageFormat(f"the input is {what}, not a PNG, JPEG or TIFF image")


_OTHER_FORMATS = (
    (b"GIF8", "a GIF image"),
    (b"BM", "a BMP image"),
    (b"\x00\x00\x00\x0cjP  ", "a JPEG 2000 image"),
    (b"%PDF", "a PDF document"),
    (b"PK\x03\x04", "a ZIP archive"),
    (b"\x1f\x8b", "a gzip archive"),
    (b"\x93NUMPY", "a NumPy array"),
)


def _check_pixels(width: int, height: int, planes: int, samples: int, max_pixels: int) -> None:
    if width < 1 or height < 1:
        raise ImageDecodeError(f"the image declares {width}x{height} pixels")
    pixels = width * height * planes
    what = f"{width}x{height}" + (f" x {planes} pages" if planes > 1 else "")
    if pixels > max_pixels:
        raise ImageTooLarge(
            f"the image declares {what} = {pixels:,} pixels, over the limit of {max_pixels:,}"
        )
    if pixels * samples > max_pixels * _MAX_SAMPLES_PER_PIXEL:
        raise ImageTooLarge(
            f"the image declares {what} pixels of {samples} samples each, over the limit of "
            f"{max_pixels * _MAX_SAMPLES_PER_PIXEL:,} samples ({_MAX_SAMPLES_PER_PIXEL} per allowed pixel)"
        )


def _decode_pillow(content: bytes, fmt: str, max_pixels: int) -> np.ndarray[Any, Any]:
    # The plugin classes parse the header only; Image.open would apply Pillow's own global bomb limit.
    image: Image.Image
    if fmt == "PNG":
        image = PngImagePlugin.PngImageFile(io.BytesIO(content))
    else:
        image = JpegImagePlugin.JpegImageFile(io.BytesIO(content))
    with image:
        width, height = image.size
        _check_pixels(width, height, 1, len(image.getbands()), max_pixels)
        image.load()
        orientation = image.getexif().get(0x0112, 1)
        if orientation in (2, 3, 4, 5, 6, 7, 8):
            image = ImageOps.exif_transpose(image)
        return _pillow_samples(image)


def _pillow_pixels(image: Image.Image) -> FloatArray:
    """A loaded Pillow image as H x W x C float32 in [0, 1] (alpha dropped, colour modes as RGB)."""
    samples = _pillow_samples(image)
    return _scaled(samples)


def _pillow_samples(image: Image.Image) -> np.ndarray[Any, Any]:
    """``_pillow_pixels``, but 8-bit samples as they are: H x W x C uint8."""
    mode = image.mode
    if mode in ("P", "PA"):
        image = image.convert("RGBA" if mode == "PA" or "transparency" in image.info else "RGB")
    elif mode not in ("1", "L", "LA", "La", "RGB", "RGBA", "RGBa", "RGBX", "I", "F") and not mode.startswith(
        "I;16"
    ):
        image = image.convert("RGB")  # CMYK, YCbCr, LAB, HSV
    array = np.asarray(image)
    if array.ndim == 3:
        array = array[:, :, :1] if image.mode in ("LA", "La") else array[:, :, :3]
    top: float | None = None
    if image.mode == "I":  # 32-bit integer mode: a 16-bit PNG in old Pillows, or a TIFF of other depths
        if image.format == "PNG":
            top = 65535.0
        elif isinstance(image, TiffImagePlugin.TiffImageFile):
            bits = image.tag_v2.get(258, (32,))
            bits = int(bits[0] if isinstance(bits, tuple) else bits)
            sampleformat = image.tag_v2.get(339, (1,))
            signed = (sampleformat[0] if isinstance(sampleformat, tuple) else sampleformat) == 2
            top = float(2 ** (bits - 1) - 1 if signed else 2**bits - 1)
    if array.dtype == np.uint8:  # top is None: 8-bit samples are divided by 255
        return array if array.ndim == 3 else array[:, :, None]
    return _to_unit(array, top)


def _scaled(samples: np.ndarray[Any, Any]) -> FloatArray:
    """``decode_samples``' result as ``decode`` gives it: 8-bit samples / 255, floats as they are."""
    return _to_unit(samples, None) if samples.dtype == np.uint8 else samples


def _to_unit(array: np.ndarray[Any, Any], top: float | None) -> FloatArray:
    """Samples as float32 in [0, 1], with a trailing channel axis: integers divided by ``top`` (default: the
    type's maximum) and clipped, floats clipped (NaN -> 0), bool as 0/1."""
    if array.ndim == 2:
        array = array[:, :, None]
    kind = array.dtype.kind
    if kind == "b":
        return array.astype(np.float32)
    if kind in "ui":
        info = np.iinfo(array.dtype)
        scale = float(info.max) if top is None else top
        out = array.astype(np.float32)
        out /= np.float32(scale)
        if kind == "i" or scale < info.max:
            np.clip(out, 0.0, 1.0, out=out)
        return out
    if kind == "f":
        out = array.astype(np.float32)  # a copy: the caller's array is never changed
        np.nan_to_num(out, copy=False, nan=0.0, posinf=1.0, neginf=0.0)
        np.clip(out, 0.0, 1.0, out=out)
        return out
    raise ImageDecodeError(f"image samples of type {array.dtype} are not supported")


def _tifffile() -> Any:
    try:
        import tifffile
    except ImportError as exc:  # a deployment problem, not the client's: not an ImageDecodeError
        raise RuntimeError(
            "decoding TIFF images needs the tifffile package; install it next to Pillow "
            "(pip install 'tifffile>=2025.1.1')"
        ) from exc
    return tifffile


def _decode_tiff(content: bytes, pages: Pages, max_pixels: int) -> FloatArray:
    tf = _tifffile()
    with tf.TiffFile(io.BytesIO(content)) as tif:
        if not tif.series:
            raise ImageDecodeError("the TIFF has no image in it")
        series = tif.series[0]
        keyframe: tifffile.TiffPage = series.keyframe
        source = keyframe if pages == "first" else series
        axes: str = source.axes
        shape: tuple[int, ...] = tuple(source.shape)
        if "Y" not in axes or "X" not in axes:
            raise ImageDecodeError(f"the TIFF's image has axes {axes!r}, no Y and X")
        samples = shape[axes.index("S")] if "S" in axes else 1
        height, width = shape[axes.index("Y")], shape[axes.index("X")]
        planes = math.prod(shape) // (samples * height * width)
        _check_pixels(width, height, planes, samples, max_pixels)
        if keyframe.compression not in tf.TIFF.DECOMPRESSORS:
            return _decode_tiff_with_pillow(content, pages)
        array = source.asarray(maxworkers=1)
        photometric = int(keyframe.photometric)
        if photometric == 3 and keyframe.colormap is not None:  # palette -> RGB
            colormap = np.asarray(keyframe.colormap)
            lut = (colormap.T / (255.0 if colormap.max() < 256 else 65535.0)).astype(np.float32)
            array = lut[np.minimum(array, len(lut) - 1)]
            axes += "S"
            samples = 3
        elif photometric == 2 and samples > 3:  # RGB with extra samples (alpha): keep RGB
            array = np.take(array, (0, 1, 2), axis=axes.index("S"))
        # Bring Y, X first and every other axis (pages, z, samples...) into one channel axis.
        y, x = axes.index("Y"), axes.index("X")
        order = [y, x, *(i for i in range(array.ndim) if i not in (y, x))]
        array = np.transpose(array, order).reshape(height, width, -1)
        top = None
        if array.dtype.kind == "u" and 0 < keyframe.bitspersample < array.dtype.itemsize * 8:
            top = float(2**keyframe.bitspersample - 1)
        out = _to_unit(array, top)
        if photometric == 0:  # MinIsWhite
            np.subtract(1.0, out, out=out)
        return out


def _decode_tiff_with_pillow(content: bytes, pages: Pages) -> FloatArray:
    """Pages of a TIFF whose compression tifffile cannot read alone (LZW, JPEG), decoded by Pillow's libtiff;
    pages of another size than the first (thumbnails) are left out."""
    image = TiffImagePlugin.TiffImageFile(io.BytesIO(content))
    with image:
        size = image.size
        frames = []
        for index in range(image.n_frames if pages == "all" else 1):
            image.seek(index)
            if image.size != size:
                continue
            image.load()
            frames.append(_pillow_pixels(image))
    return frames[0] if len(frames) == 1 else np.concatenate(frames, axis=2)


# ---- channels, resize, normalisation -------------------------------------------------------------------


def prepare(image: ImageInput, spec: PreprocessSpec, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> FloatArray:
    """An image (array, bytes or Path) as ``size x size x channels`` float32 in [0, 1]: decoded, channel rules
    applied, resized, not normalised. This is what ``image_stats`` describes and ``normalise`` finishes.

    A float32 array that needs no change is returned as is (not copied): don't write into the result."""
    if isinstance(image, np.ndarray):
        array = as_float_image(image)
    else:
        array = decode(image, pages=pages_for(spec), max_pixels=max_pixels)
    channels = spec.channels
    present = array.shape[2]
    if present > channels:  # fewer channels first: less to resize
        if channels == 1 and present == 3:
            r, g, b = array[:, :, 0], array[:, :, 1], array[:, :, 2]
            luma = r * np.float32(LUMA_WEIGHTS[0])
            luma += g * np.float32(LUMA_WEIGHTS[1])
            luma += b * np.float32(LUMA_WEIGHTS[2])
            array = luma[:, :, None]
        else:
            array = array[:, :, :channels]
    array = _resize(array, spec.size)
    if present < channels:
        array = array[:, :, np.arange(channels) % present]
    return array


def normalise(prepared: FloatArray, spec: PreprocessSpec, *, out: FloatArray | None = None) -> FloatArray:
    """``prepare``'s output as ``channels x size x size`` float32, ``(x - mean) / std`` per channel; written
    into ``out`` when given."""
    expected = (spec.size, spec.size, spec.channels)
    if prepared.shape != expected:
        raise ValueError(f"normalise expects a prepared {expected} image, got {prepared.shape}")
    if out is None:
        out = np.empty((spec.channels, spec.size, spec.size), dtype=np.float32)
    mean = np.asarray(spec.mean, dtype=np.float32).reshape(-1, 1, 1)
    std = np.asarray(spec.std, dtype=np.float32).reshape(-1, 1, 1)
    np.subtract(prepared.transpose(2, 0, 1), mean, out=out)
    np.divide(out, std, out=out)
    return out


def normalise_pixels(pixels: np.ndarray[Any, Any], spec: PreprocessSpec) -> FloatArray:
    """N x C x S x S uint8 samples (``decode_samples`` of images already ``S x S x C``, channels first) as the
    model's input: ``normalise(as_float_image(...))`` of each, to the bit. The Python backend's ``model.py``
    runs the same three float32 operations on the device (divide by 255, subtract the mean, divide by the
    std, each a true IEEE operation)."""
    out = pixels.astype(np.float32)
    out /= np.float32(255)
    out -= np.asarray(spec.mean, dtype=np.float32).reshape(-1, 1, 1)
    out /= np.asarray(spec.std, dtype=np.float32).reshape(-1, 1, 1)
    return out


def preprocess(
    image: ImageInput, spec: PreprocessSpec, *, max_pixels: int = DEFAULT_MAX_PIXELS
) -> FloatArray:
    """An image (H x W (x C) array, bytes or Path) as the model's input for one image: C x H x W float32."""
    return normalise(prepare(image, spec, max_pixels=max_pixels), spec)


def preprocess_batch(
    items: Iterable[ImageInput], spec: PreprocessSpec, *, max_pixels: int = DEFAULT_MAX_PIXELS
) -> FloatArray:
    """Images as one contiguous N x C x H x W float32 batch (N may be 0).

    An undecodable item raises ``ImageDecodeError`` whose message starts with ``image <index>:``.
    """
    images = list(items)
    batch = np.empty((len(images), spec.channels, spec.size, spec.size), dtype=np.float32)
    for index, image in enumerate(images):
        try:
            prepared = prepare(image, spec, max_pixels=max_pixels)
        except ImageDecodeError as exc:
            raise type(exc)(f"image {index}: {exc}") from exc
        normalise(prepared, spec, out=batch[index])
    return batch


def _resize(array: FloatArray, size: int) -> FloatArray:
    height, width, channels = array.shape
    if height != size:
        rows = _weights(height, size)  # (size, height)
        array = (rows @ array.reshape(height, width * channels)).reshape(size, width, channels)
    if width != size:
        cols = _weights(width, size)  # (size, width)
        array = np.matmul(cols, array)  # (size, width, channels) per row -> (size, size, channels)
    return array


@lru_cache(maxsize=512)
def _weights(source: int, target: int) -> FloatArray:
    """The (target, source) matrix of Pillow's BILINEAR resampling along one axis: a triangle filter whose
    support widens by the scale factor when shrinking, rows normalised to sum 1 (edges clamped)."""
    scale = source / target
    support = max(scale, 1.0)
    centres = (np.arange(target, dtype=np.float64) + 0.5) * scale
    positions = np.arange(source, dtype=np.float64) + 0.5
    weights = np.clip(1.0 - np.abs(positions[None, :] - centres[:, None]) / support, 0.0, None)
    weights /= weights.sum(axis=1, keepdims=True)
    matrix = weights.astype(np.float32)
    matrix.setflags(write=False)
    return matrix


# ---- fitting -------------------------------------------------------------------------------------------


def fit_spec(
    images: Iterable[ImageInput], size: int, channels: int, *, max_pixels: int = DEFAULT_MAX_PIXELS
) -> PreprocessSpec:
    """A spec whose per-channel mean and std are those of ``images`` after ``prepare`` (resized, channel
    rules applied), so normalising them gives mean 0 and std 1 per channel. Fit it on the train split only.

    Statistics are accumulated in float64 (Chan's parallel update per image); the std is the population
    std over all pixels of all images, and a constant channel (std < 1e-6) keeps std 1.
    """
    base = PreprocessSpec.identity(size, channels)
    count = 0
    mean = np.zeros(channels, dtype=np.float64)
    m2 = np.zeros(channels, dtype=np.float64)
    for image in images:
        samples = prepare(image, base, max_pixels=max_pixels).reshape(-1, channels).astype(np.float64)
        n = samples.shape[0]
        image_mean = samples.mean(axis=0)
        image_m2 = np.square(samples - image_mean).sum(axis=0)
        total = count + n
        delta = image_mean - mean
        mean += delta * (n / total)
        m2 += image_m2 + np.square(delta) * (count * n / total)
        count = total
    if count == 0:
        raise ValueError("fit_spec needs at least one image")
    std = np.sqrt(m2 / count)
    std = np.where(std < _MIN_STD, 1.0, std)
    return PreprocessSpec(size=size, channels=channels, mean=tuple(mean.tolist()), std=tuple(std.tolist()))


# ---- statistics ----------------------------------------------------------------------------------------


def _percentiles(values: np.ndarray[Any, Any], *qs: float) -> list[float]:
    """``np.percentile(values, qs)`` (its default linear method, the same arithmetic) from the order
    statistics it interpolates between (``_order_statistics``)."""
    positions = [q / 100 * (len(values) - 1) for q in qs]
    below = [int(np.floor(p)) for p in positions]
    above = [min(b + 1, len(values) - 1) for b in below]
    found = _order_statistics(values, [*below, *above])
    out = []
    for position, lo, hi in zip(positions, below, above, strict=True):
        a, b, t = found[lo], found[hi], position - lo
        out.append(b - (b - a) * (1 - t) if t >= 0.5 else a + (b - a) * t)
    return out


_SAMPLED_FROM = 8192  # fewer values are partitioned whole
_SAMPLE = 1024


def _order_statistics(values: np.ndarray[Any, Any], ranks: list[int]) -> dict[int, float]:
    """The ``k``-th smallest of a 1-d array for each ``k`` in ``ranks``, exactly (what ``np.partition`` puts
    at ``k``), 3x faster than one partition of 224 x 224 values when the ranks lie in the tails: a strided
    sample gives a threshold a few standard errors beyond the ranks of each tail, the values beyond it (a few
    percent) are partitioned alone, and their count proves they hold the ranks (else: a whole partition)."""
    n = len(values)
    wanted = sorted(set(ranks))
    found: dict[int, float] = {}
    if n >= _SAMPLED_FROM:
        sample = values[:: n // _SAMPLE]
        m = len(sample)
        low = [k for k in wanted if k < n // 2]
        high = [k for k in wanted if k >= n // 2]
        spans = []
        if low:  # ranks <= max(low): the values <= a threshold ranked past it in the sample
            expected = max(low) / n * m
            spans.append(min(m - 1, int(expected + 4 * math.sqrt(expected) + 4)))
        if high:  # likewise from the top
            expected = (n - 1 - min(high)) / n * m
            spans.append(max(0, m - 1 - int(expected + 4 * math.sqrt(expected) + 4)))
        ordered = np.partition(sample, spans)
        if low:
            inside = values[values <= ordered[spans[0]]]
            if len(inside) > max(low):  # the len(inside) smallest values, all of them
                part = np.partition(inside, low)
                found.update((k, float(part[k])) for k in low)
        if high:
            inside = values[values >= ordered[spans[-1]]]
            skipped = n - len(inside)  # the values below: inside holds ranks skipped.. n-1
            if skipped <= min(high):
                part = np.partition(inside, [k - skipped for k in high])
                found.update((k, float(part[k - skipped])) for k in high)
    if missing := [k for k in wanted if k not in found]:
        ordered = np.partition(values, missing)
        found.update((k, float(ordered[k])) for k in missing)
    return found


def image_stats(image: np.ndarray[Any, Any]) -> dict[str, float]:
    """``mean``, ``std``, ``contrast`` (p98 - p2) and ``sharpness`` (variance of the Laplacian) of an image in
    [0, 1] (H x W or H x W x C, as ``decode`` or ``prepare`` give it), on its gray image (mean over channels).

    Deterministic, in float64; compute it on ``prepare``'s output so training and live traffic compare alike.
    """
    array = as_float_image(image)
    gray = array[:, :, 0].astype(np.float64)
    if array.shape[2] > 1:  # array.mean(axis=2, dtype=np.float64) to the bit, 14x faster on 224 x 224 x 3
        for channel in range(1, array.shape[2]):
            gray += array[:, :, channel]
        gray /= array.shape[2]
    flat = gray.ravel()
    low, high = _percentiles(flat, 2.0, 98.0)
    mean, variance = _mean_var(flat)
    height, width = gray.shape
    if height >= 3 and width >= 3:
        # left + right + up + down - 4 x centre on whole rows of the flat image, where each neighbour is one
        # contiguous slice (3x faster than on 2-d views); the first and last column of each row wrap around
        # and are dropped after
        end = (height - 1) * width
        laplacian = np.add(flat[width - 1 : end - 1], flat[width + 1 : end + 1])
        laplacian += flat[: end - width]
        laplacian += flat[2 * width :]
        laplacian -= 4.0 * flat[width:end]
        sharpness = _mean_var(laplacian.reshape(height - 2, width)[:, 1:-1].ravel())[1]
    else:
        sharpness = 0.0
    return {
        "mean": mean,
        "std": float(np.sqrt(variance)),
        "contrast": float(high - low),
        "sharpness": sharpness,
    }


def _mean_var(values: np.ndarray[Any, Any]) -> tuple[float, float]:
    """``values.mean()`` and ``values.var()`` of a 1-d float64 array by numpy's own arithmetic, to the bit,
    without its generic bookkeeping: the statistics of a 32 x 32 image in 58 µs instead of 104."""
    mean = np.add.reduce(values) / values.size
    deviations = values - mean
    np.multiply(deviations, deviations, out=deviations)
    return float(mean), float(np.add.reduce(deviations) / values.size)
