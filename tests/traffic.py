"""Live traffic for the monitor's tests and bench: images through a trained model, as the gateway logs them.

``Traffic(model_dir)`` loads the exported TorchScript and serving spec of one version; ``samples(images)``
prepares the images with the gateway's own function (decode, preprocess, image statistics), runs the model
in-process and builds the ``InferenceSample`` the gateway would log. The drifts (``brighter``, ``blurred``,
``rotated``, ``letters``) turn the held-out digits into shifted traffic.
"""

from __future__ import annotations

import hashlib
import io
import json
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from contracts.events import InferenceSample
from deploy.local.loop import brighter
from services.ingest.manifest import assign_split
from services.runtime.preprocessing import PreprocessSpec
from services.serving.gateway.app import _prepare_all, _stats
from services.serving.gateway.catalog import ServedSpec
from tests import images

__all__ = ["Traffic", "blurred", "brighter", "held_out", "letters", "rotated"]


class Traffic:
    def __init__(self, model_dir: Path, version: int) -> None:
        import torch

        doc = json.loads((model_dir / "serving_spec.json").read_text())
        self.spec = ServedSpec(
            PreprocessSpec.from_dict(doc["preprocessing"]), tuple(doc["labels"]), doc["inputs"][0]["name"]
        )
        self.model = torch.jit.load(str(model_dir / "model.pt"), map_location="cpu").eval()
        self.version = version

    def outputs(self, data: list[bytes]) -> tuple[np.ndarray, np.ndarray, list]:
        import torch

        batch, prepared = _prepare_all(data, self.spec, True)
        with torch.inference_mode():
            logits, embedding = self.model(torch.from_numpy(batch))
        return logits.numpy(), embedding.numpy(), _stats(prepared)

    def samples(
        self, data: list[bytes], *, route: str = "active", version: int | None = None
    ) -> list[InferenceSample]:
        logits, embedding, stats = self.outputs(data)
        shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
        probabilities = shifted / shifted.sum(axis=1, keepdims=True)
        top = probabilities.argmax(axis=1)
        now = datetime.now(UTC)
        return [
            InferenceSample(
                prediction_id=hashlib.md5(f"{now.isoformat()}{i}".encode()).hexdigest(),
                time=now,
                version=version or self.version,
                route=route,  # type: ignore[arg-type]
                latency_ms=2.0,
                label=self.spec.labels[int(top[i])],
                confidence=float(probabilities[i, top[i]]),
                image_stats=stats[i],
                embedding=embedding[i].tolist(),
            )
            for i in range(len(data))
        ]


def held_out(split: str = "test") -> list[tuple[str, bytes]]:
    """The digits of one split (assigned by content hash, as ingest does): (label, PNG bytes)."""
    return [
        (label, data)
        for label, _, data in images.digits_images()
        if assign_split(hashlib.md5(data).hexdigest()) == split
    ]


def _edit(data: bytes, change) -> bytes:  # type: ignore[no-untyped-def]
    out = io.BytesIO()
    change(Image.open(io.BytesIO(data)).convert("L")).save(out, format="PNG")
    return out.getvalue()


def blurred(data: bytes, radius: float = 2.0) -> bytes:
    return _edit(data, lambda im: im.filter(ImageFilter.GaussianBlur(radius)))


def rotated(data: bytes, degrees: float = 90) -> bytes:
    return _edit(data, lambda im: im.rotate(degrees))


def letters(count: int, seed: int = 0) -> list[bytes]:
    """Letters drawn like the digits (8 x 8 blocks, upscaled): a class the model never saw."""
    from PIL import ImageDraw

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        glyph = Image.new("L", (8, 8), 0)
        ImageDraw.Draw(glyph).text((1, -2), chr(int(rng.integers(65, 91))), fill=255)
        pixels = np.asarray(glyph, dtype=np.uint8).repeat(4, axis=0).repeat(4, axis=1)
        buffer = io.BytesIO()
        Image.fromarray(pixels, "L").save(buffer, format="PNG")
        out.append(buffer.getvalue())
    return out
