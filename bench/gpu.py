"""GPU benchmarks, each printing one JSON line: training (the default) and serving.

Training (``python3 bench/gpu.py [train]``): the trainer's loop against a bare torch loop, ResNet option,
synthetic data. Runs from the source tree on a machine that has torch (and numpy) and none of Conveyor's
other packages: it imports only ``services/trainer/model.py`` and ``services/trainer/training.py``. Prints
images/s of a bare ResNet loop (bf16 autocast, channels-last) and of the trainer's loop on the same model,
data and batch size, side by side, and their ratio (target >= 0.9). Measured on an H100: 11,659 vs 11,736
images/s (1.01).

Run on the GPU machine:  python3 bench/gpu.py            (3x224x224, batch 256)
Try it on a CPU:         python3 bench/gpu.py --device cpu --size 32 --images 256 --batch 64

Serving (``python3 bench/gpu.py serve``, in ``bench/gpu_serve.py``): raw torch, Triton on the GPU and the
gateway; it needs serving's packages beside torch (``bench/gpu-carry.sh`` here, ``bench/gpu-run.sh`` there).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from services.trainer.model import build_model
from services.trainer.training import resolve_device, train


def progress(stage: str) -> None:
    print(f"bench/gpu.py: {stage} ...", file=sys.stderr, flush=True)


def synthetic(images: int, size: int, classes: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, images).astype(np.int64)
    x = rng.standard_normal((images, 3, size, size), dtype=np.float32)
    x[:, 0] += (y[:, None, None] / classes).astype(np.float32)  # learnable, so the loss moves
    return x, y


def bare(x: np.ndarray, y: np.ndarray, classes: int, args: argparse.Namespace, dev: torch.device) -> float:
    """The plainest fast loop: data on the device, bf16 autocast on CUDA, channels-last, AdamW."""
    model = build_model("resnet", 3, classes, args.size).to(dev)
    if dev.type == "cuda":
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    xt, yt = torch.from_numpy(x).to(dev), torch.from_numpy(y).to(dev)
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda")
    model.train()

    def epoch() -> None:
        order = torch.randperm(len(xt), device=dev)
        for i in range(0, len(xt) - args.batch + 1, args.batch):
            idx = order[i : i + args.batch]
            batch = xt[idx]
            if dev.type == "cuda":
                batch = batch.contiguous(memory_format=torch.channels_last)
            with autocast:
                logits, _ = model(batch)
                loss = torch.nn.functional.cross_entropy(logits, yt[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    epoch()  # warm-up: cuDNN autotuning, allocator
    _sync(dev)
    started = time.perf_counter()
    for _ in range(args.epochs):
        epoch()
    _sync(dev)
    steps = (len(xt) // args.batch) * args.batch
    return steps * args.epochs / (time.perf_counter() - started)


def trainer(x: np.ndarray, y: np.ndarray, classes: int, args: argparse.Namespace, dev: torch.device) -> float:
    """The trainer's loop (class weights, validation each epoch, early-stopping bookkeeping), as it reports
    its own training images/s; one extra epoch is its warm-up, like the bare loop's."""
    hp = SimpleNamespace(
        epochs=args.epochs + 1, batch_size=args.batch, learning_rate=1e-3, seed=0, early_stopping_patience=0
    )
    val = max(args.batch, len(x) // 20)
    model = build_model("resnet", 3, classes, args.size)
    result = train(model, (x[val:], y[val:]), (x[:val], y[:val]), hp, device=dev, deterministic=False)  # type: ignore[arg-type]
    warm = [e.images_per_s for e in result.history[1:]] or [result.images_per_s]
    return float(np.median(warm))


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def main(args: argparse.Namespace) -> dict[str, Any]:
    """The bare ResNet training loop against the trainer's, side by side."""
    dev = resolve_device(args.device)
    torch.backends.cudnn.benchmark = True
    x, y = synthetic(args.images, args.size, args.classes)
    progress(
        f"bare ResNet loop on {dev}, {args.images} images of 3x{args.size}x{args.size}, batch {args.batch}"
    )
    bare_rate = bare(x, y, args.classes, args, dev)
    progress("the trainer's loop, same model, data and batch")
    trainer_rate = trainer(x, y, args.classes, args, dev)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    return {
        "bench": "gpu",
        "device": name,
        "image": [3, args.size, args.size],
        "batch": args.batch,
        "bare_images_per_s": round(bare_rate),
        "trainer_images_per_s": round(trainer_rate),
        "ratio": round(trainer_rate / bare_rate, 3),
        "targets": {"ratio": 0.9},
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: CUDA when present)")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--images", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs after one warm-up epoch")


if __name__ == "__main__":
    import gpu_serve

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parts = parser.add_subparsers(dest="part")
    add_arguments(parts.add_parser("train", help="training (the default)", description=main.__doc__))
    gpu_serve.add_arguments(
        parts.add_parser(
            "serve",
            help="serving: raw torch, Triton on the GPU, the gateway",
            description=gpu_serve.__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
    )
    argv = sys.argv[1:]
    if not argv or argv[0] not in ("train", "serve", "-h", "--help"):
        argv = ["train", *argv]  # ``bench/gpu.py --size 32`` is the training bench, as before
    args = parser.parse_args(argv)
    print(json.dumps(gpu_serve.main(args) if args.part == "serve" else main(args)))
