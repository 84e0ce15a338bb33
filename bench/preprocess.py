"""What one image costs on the CPU, in process (no servers); prints one JSON line.

- ingest's check of a file (``services/ingest/validation.py``, which decodes every pixel): CPU time for
  1,000 digit PNGs (32x32, gray), wall time for one 200 MB 16-bit TIFF (10,000 x 10,000, which the default
  limits admit), and the time to refuse each decompression bomb (PNG, JPEG, TIFF, 4-10 Gpx declared in a few
  KB) from its header;
- preprocessing (``services/runtime/preprocessing.py``, shared by the trainer and the gateway): a batch of
  256 RGB PNGs of 32x32 (targets: <= 100 ms per batch, <= 1 ms per image), and one 224x224 RGB JPEG;
- the drift statistics of one prepared image (``image_stats``, which the gateway computes for every logged
  prediction), at 32x32x3 and 224x224x3.

Each figure is the median of several rounds after a warm-up. Run: ``.venv/bin/python bench/preprocess.py``
(``make bench``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from services.ingest.validation import DEFAULT_LIMITS, ImageInfo, Rejection, check_image
from services.runtime.preprocessing import PreprocessSpec, image_stats, prepare, preprocess_batch
from tests import images


def progress(stage: str) -> None:
    print(f"bench/preprocess.py: {stage} ...", file=sys.stderr, flush=True)


def median_s(
    work: Callable[[], object], rounds: int, clock: Callable[[], float] = time.perf_counter
) -> float:
    """The median of ``rounds`` timings of ``work`` (after one untimed call), in seconds."""
    work()
    timings = []
    for _ in range(rounds):
        start = clock()
        work()
        timings.append(clock() - start)
    return statistics.median(timings)


def validation(rounds: int) -> dict[str, Any]:
    progress("ingest's check of 1,000 PNGs, a 200 MB TIFF and three bombs")
    pngs = [png for _, _, png in images.digits_images(1000)]
    assert all(isinstance(check_image(png), ImageInfo) for png in pngs)
    pngs_cpu = median_s(lambda: [check_image(png) for png in pngs], rounds, time.process_time)
    tiff = images.large_tiff16(10_000, 10_000)
    assert isinstance(check_image(tiff, DEFAULT_LIMITS), ImageInfo), "the default limits refuse a 200 MB TIFF"
    tiff_s = median_s(lambda: check_image(tiff, DEFAULT_LIMITS), max(1, rounds // 2))
    bombs: dict[str, float] = {}
    for name, make in (("png", images.png_bomb), ("jpeg", images.jpeg_bomb), ("tiff", images.tiff_bomb)):
        bomb = make()
        refused = check_image(bomb)
        assert isinstance(refused, Rejection) and refused.code == "too_many_pixels", refused
        bombs[name] = round(median_s(partial(check_image, bomb), rounds) * 1e3, 3)
    return {
        "pngs_1000_cpu_s": round(pngs_cpu, 3),
        "tiff_200mb_s": round(tiff_s, 2),
        "tiff_mb": round(len(tiff) / 1e6),
        "bomb_refused_ms": bombs,
    }


def preprocessing(rounds: int) -> dict[str, Any]:
    progress("preprocessing 256 PNGs of 32x32 and one 224x224 JPEG")
    spec = PreprocessSpec.identity(32, 3)
    batch = [images.rgb_png(32, 32, seed=seed) for seed in range(256)]
    batch_s = median_s(lambda: preprocess_batch(batch, spec), rounds)
    big_spec = PreprocessSpec.identity(224, 3)
    jpeg = images.jpeg(224, 224, seed=1)
    jpeg_s = median_s(lambda: preprocess_batch([jpeg], big_spec), rounds * 5)
    return {
        "batch_256_png_32_ms": round(batch_s * 1e3, 1),
        "per_png_32_ms": round(batch_s / len(batch) * 1e3, 3),
        "jpeg_224_ms": round(jpeg_s * 1e3, 2),
        "target_batch_ms": 100,
        "target_per_image_ms": 1,
    }


def drift_statistics(rounds: int) -> dict[str, float]:
    progress("image_stats at 32x32x3 and 224x224x3")
    figures = {}
    for size, source in ((32, images.rgb_png(32, 32, seed=2)), (224, images.jpeg(224, 224, seed=2))):
        prepared = prepare(source, PreprocessSpec.identity(size, 3))
        figures[f"image_stats_{size}_us"] = round(
            median_s(partial(image_stats, prepared), rounds * 20) * 1e6, 1
        )
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds of each figure (median reported)")
    args = parser.parse_args()
    result = {
        "validation": validation(args.rounds),
        "preprocessing": preprocessing(args.rounds),
        "drift_statistics": drift_statistics(args.rounds),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
