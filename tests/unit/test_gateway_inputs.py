"""How the gateway turns a request's images into Triton's input (``_prepare_all``), without Triton: uint8
``pixels`` when the version takes them and every image is 8-bit at the model's size and channels, else
float32 ``image``; either way the model sees the same numbers."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from services.runtime.preprocessing import (
    ImageDecodeError,
    PreprocessSpec,
    image_stats,
    normalise_pixels,
    preprocess_batch,
)
from services.serving.gateway.app import _prepare_all
from services.serving.gateway.catalog import ServedSpec

pytestmark = pytest.mark.unit

PRE = PreprocessSpec(size=16, channels=3, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
WITH_PIXELS = ServedSpec(PRE, ("a", "b"), "image", pixels="pixels")
WITHOUT = ServedSpec(PRE, ("a", "b"), "image")


def encoded(size: int, fmt: str = "PNG", mode: str = "RGB", seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    shape = (size, size, 3) if mode == "RGB" else (size, size)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(buf, format=fmt)
    return buf.getvalue()


def test_8_bit_images_at_the_models_size_go_as_pixels() -> None:
    images = [encoded(16, seed=1), encoded(16, "JPEG", seed=2)]
    batch, kept = _prepare_all(images, WITH_PIXELS, keep_prepared=True)
    assert batch.dtype == np.uint8 and batch.shape == (2, 3, 16, 16)
    # what the model makes of them is what the float path would have sent, to the bit
    assert normalise_pixels(batch, PRE).tobytes() == preprocess_batch(images, PRE).tobytes()
    # the statistics of the samples are those of the prepared image
    floats, prepared = _prepare_all(images, WITHOUT, keep_prepared=True)
    assert floats.dtype == np.float32 and floats.tobytes() == preprocess_batch(images, PRE).tobytes()
    assert [image_stats(k) for k in kept] == [image_stats(p) for p in prepared]
    assert _prepare_all(images, WITH_PIXELS, keep_prepared=False)[1] == []


@pytest.mark.parametrize(
    "odd_one",
    [encoded(20), encoded(16, mode="L")],  # another size (resampled), another channel count (channel rule)
    ids=["resized", "gray"],
)
def test_one_image_that_needs_more_than_scaling_sends_the_request_as_floats(odd_one: bytes) -> None:
    for images in ([encoded(16, seed=3), encoded(16, seed=4), odd_one], [odd_one, encoded(16, seed=3)]):
        batch, kept = _prepare_all(images, WITH_PIXELS, keep_prepared=True)
        assert batch.dtype == np.float32 and batch.tobytes() == preprocess_batch(images, PRE).tobytes()
        assert [k.dtype for k in kept] == [np.float32] * len(images)


def test_a_16_bit_image_goes_as_floats_and_a_bad_one_names_its_index() -> None:
    buf = io.BytesIO()
    sixteen = np.random.default_rng(4).integers(0, 65536, (16, 16), dtype=np.uint16)
    Image.fromarray(sixteen).save(buf, format="PNG")
    gray = ServedSpec(
        PreprocessSpec(size=16, channels=1, mean=(0.5,), std=(0.25,)), ("a",), "image", "l", "e", "p"
    )
    batch, _ = _prepare_all([buf.getvalue()], gray, keep_prepared=False)
    assert batch.dtype == np.float32
    with pytest.raises(ImageDecodeError, match=r"^image 1: "):
        _prepare_all([encoded(16), b"\x89PNG\r\n\x1a\n broken"], WITH_PIXELS, keep_prepared=False)
