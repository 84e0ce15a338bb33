"""Trainer benchmark; prints one JSON line.

(a) training throughput (images/s) of the trainer's loop against a bare torch loop on the same model and
    data, measured side by side and alternating (target >= 0.9x);
(b) time from ``dataset.versioned`` to ``model.trained`` for the digits, through the real service with
    nats-server, rclone S3, DVC and MLflow started for the run.

Run: ``.venv/bin/python bench/train.py`` (``make bench``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import structlog
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from contracts.events import ModelTrained, ModelTrainingFailed
from contracts.kv import Hyperparameters
from deploy.local.natsconf import ADMIN_USER
from services.ingest.datarepo import DataRepo
from services.runtime.bus import EventBus
from services.runtime.config import Settings
from services.runtime.consumer import Delivery
from services.runtime.preprocessing import fit_spec, preprocess_batch
from services.trainer.app import build
from services.trainer.config import TrainerSettings
from services.trainer.model import build_model
from services.trainer.training import train
from tests import images
from tests.flows import commit_version
from tests.servers import run_mlflow, run_nats, run_s3


def progress(stage: str) -> None:
    print(f"bench/train.py: {stage} ...", file=sys.stderr, flush=True)


def digits_arrays() -> tuple[np.ndarray, np.ndarray, int]:
    items = images.digits_images()
    data = [d for _, _, d in items]
    spec = fit_spec(data, size=32, channels=1)
    return preprocess_batch(data, spec), np.array([int(label) for label, _, _ in items], dtype=np.int64), 10


def bare_loop(x: np.ndarray, y: np.ndarray, classes: int, hp: Hyperparameters) -> float:
    """The plainest loop over the same model: shuffle, forward, cross-entropy, step. Images/s."""
    torch.manual_seed(hp.seed)
    model = build_model(hp.architecture, x.shape[1], classes, hp.image_size, seed=hp.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=hp.learning_rate)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    model.train()
    started = time.perf_counter()
    for _ in range(hp.epochs):
        order = torch.randperm(len(xt))
        for i in range(0, len(xt), hp.batch_size):
            idx = order[i : i + hp.batch_size]
            logits, _ = model(xt[idx])
            loss = torch.nn.functional.cross_entropy(logits, yt[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return len(xt) * hp.epochs / (time.perf_counter() - started)


def trainer_loop(x: np.ndarray, y: np.ndarray, classes: int, hp: Hyperparameters, val: int) -> float:
    """The trainer's own loop (class weights, early-stopping bookkeeping, validation each epoch). Images/s
    of training alone, as the trainer reports it."""
    model = build_model(hp.architecture, x.shape[1], classes, hp.image_size, seed=hp.seed)
    result = train(model, (x[val:], y[val:]), (x[:val], y[:val]), hp, device="cpu")
    return float(result.images_per_s)


async def time_to_model(tmp: Path) -> dict[str, Any]:
    with (
        run_nats(tmp / "nats") as nats_server,
        run_s3(tmp / "s3") as s3,
        run_mlflow(tmp / "mlflow", s3) as mlflow,
    ):
        repo = DataRepo(
            tmp / "repo",
            (tmp / "data.git").as_uri(),
            "s3://dvc/bench",
            s3.endpoint,
            s3.access_key,
            s3.secret_key,
        )
        repo.ensure()
        event = commit_version(repo, images.digits_images(), 1)
        common: dict[str, Any] = {
            "subject_prefix": "bench",
            "nats_url": nats_server.url,
            "s3_endpoint": s3.endpoint,
            "s3_access_key": s3.access_key,
            "s3_secret_key": s3.secret_key,
            "mlflow_url": mlflow.url,
            "state_dir": tmp / "state",
        }
        settings = TrainerSettings(
            **common, nats_user="trainer", nats_password=nats_server.passwords["trainer"]
        )
        admin = Settings(
            **common, service="bench", nats_user=ADMIN_USER, nats_password=nats_server.passwords[ADMIN_USER]
        )
        done: asyncio.Queue[tuple[float, Any]] = asyncio.Queue()

        async def on_result(result: Any, _: Delivery) -> None:
            done.put_nowait((time.perf_counter(), result))

        await nats_server.provision("bench")
        watcher = EventBus(admin)
        watcher.consume(ModelTrained, on_result, durable="bench-trained")
        watcher.consume(ModelTrainingFailed, on_result, durable="bench-failed")
        app, _ = build(settings)
        async with watcher, app:
            started = time.perf_counter()
            await watcher.publish(event)
            finished, result = await asyncio.wait_for(done.get(), 900)
        if isinstance(result, ModelTrainingFailed):
            raise RuntimeError(f"training failed: {result.reason}")
        return {
            "versioned_to_trained_s": round(finished - started, 2),
            "training_seconds": result.training_seconds,
            "test_accuracy": result.metrics.test_accuracy,
        }


def main(args: argparse.Namespace) -> dict[str, Any]:
    x, y, classes = digits_arrays()
    hp = Hyperparameters(epochs=args.epochs, early_stopping_patience=0, batch_size=64)
    val = len(x) // 10
    progress(f"warm-up, then {args.rounds} alternating rounds of the bare loop and the trainer's loop")
    bare_loop(x[:256], y[:256], classes, hp.model_copy(update={"epochs": 1}))
    bare, ours = [], []
    for _ in range(args.rounds):
        bare.append(bare_loop(x[val:], y[val:], classes, hp))
        ours.append(trainer_loop(x, y, classes, hp, val))
    figures: dict[str, Any] = {
        "bench": "train",
        "torch_threads": torch.get_num_threads(),
        "bare_images_per_s": round(max(bare)),
        "trainer_images_per_s": round(max(ours)),
        "throughput_ratio": round(max(ours) / max(bare), 3),
    }
    progress("dataset.versioned -> model.trained through the service (digits)")
    with tempfile.TemporaryDirectory() as tmp:
        figures |= asyncio.run(time_to_model(Path(tmp)))
    figures["targets"] = {"throughput_ratio": 0.9}
    return figures


if __name__ == "__main__":
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--epochs", type=int, default=5, help="epochs per throughput run")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (best of each is kept)")
    print(json.dumps(main(parser.parse_args())))
