"""One training, start to end: the exact dataset version -> a registered, exported model version.

fetch the version's files -> decode and preprocess (the module serving uses too) -> train with the model's
hyperparameters -> evaluate on val and test -> export TorchScript (+ ONNX), the serving spec, the label map,
the reference profile for drift, a model card and the sha256 of every file -> log to MLflow -> register a
version with the alias ``candidate``. Runs in a worker thread; domain code, no broker.
"""

from __future__ import annotations

import json
import platform
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch import nn

from contracts.events import ArtifactRef, ClassMetrics, DatasetRef, ModelTrained, TrainMetrics
from contracts.kv import ModelPolicy
from services.runtime.datasets import DatasetFiles, S3Remote, fetch_version
from services.runtime.preprocessing import (
    PreprocessSpec,
    decode,
    fit_spec,
    image_stats,
    prepare,
    preprocess_batch,
)
from services.runtime.version import code_version
from services.trainer.tracking import Tracker

__all__ = ["Pipeline", "TrainJob", "TrainingFailed"]

MAX_BATCH_SIZE = 256  # what serving may batch; the exported model takes any batch up to it


class TrainingFailed(Exception):
    """The data or the training cannot succeed: reported in ``model.training_failed``, not retried."""

    def __init__(self, code: str, reason: str, run_id: str | None = None) -> None:
        super().__init__(reason)
        self.code, self.reason, self.run_id = code, reason, run_id


@dataclass(frozen=True)
class TrainJob:
    model: str
    dataset: DatasetRef
    repo_url: str
    policy: ModelPolicy
    cause_id: str  # the event that asked for it


@dataclass(frozen=True)
class _Data:
    files: DatasetFiles
    labels: list[str]
    paths: dict[str, list[Path]]  # by split
    targets: dict[str, np.ndarray]
    channels: int  # what most training images have: 1 gray, 3 RGB, N microscopy channels or pages


class Pipeline:
    def __init__(
        self, tracker: Tracker, remote: S3Remote, cache_dir: Path, device: str | None = None
    ) -> None:
        self.tracker, self.remote, self.cache_dir, self.device = tracker, remote, cache_dir, device

    def run(self, job: TrainJob, keepalive: Callable[[], None] = lambda: None) -> ModelTrained:
        from services.trainer import training
        from services.trainer.model import build_model

        started = time.monotonic()
        hp = job.policy.hyperparameters
        # The run exists from the start, so a failure of the data is recorded on it too.
        run_id = self.tracker.start(
            job.model, f"{job.dataset.name}@{job.dataset.version}", _params(job), _tags(job)
        )
        try:
            data = self._load(job)
            # Files, not decoded arrays, go into the spec and the batches: the gateway preprocesses the bytes
            # it receives the same way (multi-page TIFFs, channel rules): training and serving cannot differ.
            spec = fit_spec(data.paths["train"], size=hp.image_size, channels=data.channels)
            x = {split: preprocess_batch(paths, spec) for split, paths in data.paths.items()}
            model = build_model(hp.architecture, data.channels, len(data.labels), hp.image_size, seed=hp.seed)

            def on_epoch(epoch: training.EpochResult) -> None:
                self.tracker.log_metrics(run_id, epoch.as_metrics(), step=epoch.epoch)
                keepalive()

            result = training.train(
                model,
                (x["train"], data.targets["train"]),
                (x["val"], data.targets["val"]),
                hp,
                device=self.device,
                on_epoch=on_epoch,
            )
            val = training.evaluate(result.model, x["val"], data.targets["val"], data.labels)
            test = training.evaluate(result.model, x["test"], data.targets["test"], data.labels)
            metrics = TrainMetrics(
                val_accuracy=val["accuracy"],
                test_accuracy=test["accuracy"],
                test_macro_f1=test["macro_f1"],
                per_class={k: ClassMetrics(**v) for k, v in test["per_class"].items()},
            )
            self.tracker.log_metrics(
                run_id,
                {
                    "val_accuracy": metrics.val_accuracy,
                    "test_accuracy": metrics.test_accuracy,
                    "test_macro_f1": metrics.test_macro_f1,
                    "best_epoch": result.best_epoch,
                },
            )
            with tempfile.TemporaryDirectory(prefix="conveyor-model-") as tmp:
                out = Path(tmp)
                shas = self._export(out, job, result.model, spec, x, data, metrics, run_id)
                keepalive()
                base = self.tracker.log_artifacts(run_id, out)
            version = self.tracker.register(job.model, run_id, _version_tags(job))
            self.tracker.finish(run_id)
        except TrainingFailed as exc:
            self.tracker.finish(run_id, failed_reason=exc.reason)
            raise TrainingFailed(exc.code, exc.reason, run_id) from exc
        except MemoryError as exc:
            reason = "out of memory: lower hyperparameters.batch_size or image_size in the model's policy"
            self.tracker.finish(run_id, failed_reason=reason)
            raise TrainingFailed("out_of_memory", reason, run_id) from exc
        except Exception as exc:
            if _is_cuda_oom(exc):
                reason = f"GPU out of memory ({exc}): lower hyperparameters.batch_size in the model's policy"
                self.tracker.finish(run_id, failed_reason=reason)
                raise TrainingFailed("out_of_memory", reason, run_id) from exc
            self.tracker.finish(run_id, failed_reason=f"{type(exc).__name__}: {exc}")
            raise
        return ModelTrained(
            model=job.model,
            version=version,
            run_id=run_id,
            dataset=job.dataset,
            metrics=metrics,
            artifacts={name: ArtifactRef(uri=f"{base}/{name}", sha256=sha) for name, sha in shas.items()},
            training_seconds=round(time.monotonic() - started, 3),
            device=result.device,
        )

    def _load(self, job: TrainJob) -> _Data:
        ref = job.dataset
        files = fetch_version(
            job.repo_url,
            ref.name,
            ref.version,
            self.remote,
            self.cache_dir,
            git_rev=ref.git_rev,
            dvc_md5=ref.dvc_md5,
        )
        labels = sorted(files.labels())
        min_images = 10
        if len(labels) < 2:
            raise TrainingFailed(
                "too_few_labels",
                f"{ref.name}@{ref.version} has {len(labels)} label(s): "
                "a classifier needs at least 2 (folders <dataset>/<label>/...)",
            )
        index = {label: i for i, label in enumerate(labels)}
        paths: dict[str, list[Path]] = {"train": [], "val": [], "test": []}
        targets: dict[str, list[int]] = {"train": [], "val": [], "test": []}
        for f in files.files:
            paths[f.split].append(f.local_path)
            targets[f.split].append(index[f.label])
        for split, need in (("train", min_images), ("val", 1), ("test", 1)):
            if len(paths[split]) < need:
                raise TrainingFailed(
                    "too_few_images",
                    f"{ref.name}@{ref.version} has {len(paths[split])} {split} image(s), "
                    f"at least {need} needed: "
                    "upload more images (splits are 80/10/10 by content hash)",
                )
        channels = Counter(int(decode(p).shape[2]) for p in paths["train"]).most_common(1)[0][0]
        as_arrays = {s: np.asarray(t, dtype=np.int64) for s, t in targets.items()}
        return _Data(files, labels, paths, as_arrays, channels)

    def _export(
        self,
        out: Path,
        job: TrainJob,
        model: nn.Module,
        spec: PreprocessSpec,
        x: dict[str, np.ndarray],
        data: _Data,
        metrics: TrainMetrics,
        run_id: str,
    ) -> dict[str, str]:
        from services.trainer import export, training

        export.export_torchscript(model, x["train"][:2], out / "model.pt")
        export.export_onnx(model, x["train"][:2], out / "model.onnx")
        logits, embeddings = training.predict(model, x["val"])
        stats = [image_stats(prepare(path, spec)) for path in data.paths["val"]]  # as the gateway computes
        profile = export.reference_profile(
            logits, embeddings, data.labels, stats, seed=job.policy.hyperparameters.seed
        )
        serving_spec = export.serving_spec(
            x["train"].shape[1:],
            data.labels,
            embeddings.shape[1],
            onnx=(out / "model.onnx").exists(),
            max_batch_size=MAX_BATCH_SIZE,
            preprocessing=spec.to_dict(),
        )
        (out / "serving_spec.json").write_text(json.dumps(serving_spec, indent=2))
        (out / "labels.json").write_text(json.dumps(data.labels))
        (out / "reference_profile.json").write_text(json.dumps(profile))
        (out / "model_card.md").write_text(_model_card(job, data, metrics, run_id))
        shas = {p.name: export.sha256_file(p) for p in sorted(out.iterdir())}
        (out / "sha256.json").write_text(json.dumps(shas, indent=2))
        return shas


def _params(job: TrainJob) -> dict[str, object]:
    hp = job.policy.hyperparameters.model_dump()
    return {**hp, "dataset": f"{job.dataset.name}@{job.dataset.version}"}


def _tags(job: TrainJob) -> dict[str, str]:
    import torch

    d = job.dataset
    return {
        "conveyor.model": job.model,
        "conveyor.dataset.name": d.name,
        "conveyor.dataset.version": str(d.version),
        "conveyor.dataset.git_rev": d.git_rev,
        "conveyor.dataset.dvc_md5": d.dvc_md5,
        "conveyor.dataset.repo_url": job.repo_url,
        "conveyor.cause_id": job.cause_id,
        "conveyor.code_version": code_version(),
        "conveyor.env.python": platform.python_version(),
        "conveyor.env.torch": torch.__version__,
        "conveyor.env.numpy": np.__version__,
        "conveyor.env.platform": platform.platform(),
        "conveyor.env.executable": sys.executable,
    }


def _version_tags(job: TrainJob) -> dict[str, str]:
    d = job.dataset
    return {"dataset": f"{d.name}@{d.version}", "dataset.git_rev": d.git_rev, "dataset.dvc_md5": d.dvc_md5}


def _is_cuda_oom(exc: Exception) -> bool:
    return "out of memory" in str(exc).lower() and (
        "cuda" in str(exc).lower() or "CUDA" in type(exc).__name__
    )


def _model_card(job: TrainJob, data: _Data, metrics: TrainMetrics, run_id: str) -> str:
    d, hp = job.dataset, job.policy.hyperparameters
    rows = "\n".join(
        f"| {label} | {m.precision:.3f} | {m.recall:.3f} | {m.f1:.3f} | {m.support} |"
        for label, m in metrics.per_class.items()
    )
    counts = {split: len(paths) for split, paths in data.paths.items()}
    return f"""# {job.model}

Trained by Conveyor on **{d.name}@{d.version}** (git rev `{d.git_rev}`, DVC md5 `{d.dvc_md5}`,
repository {job.repo_url}). MLflow run `{run_id}`.

## Data
{len(data.labels)} labels: {", ".join(data.labels)}. Images: train {counts["train"]}, val {counts["val"]},
test {counts["test"]} (splits by content hash).

## Training
Architecture `{hp.architecture}`, image size {hp.image_size}, {hp.epochs} epochs at most (early stopping
patience {hp.early_stopping_patience}), batch {hp.batch_size}, learning rate {hp.learning_rate},
seed {hp.seed}.

## Metrics
Validation accuracy {metrics.val_accuracy:.4f}; test accuracy {metrics.test_accuracy:.4f}, test macro F1
{metrics.test_macro_f1:.4f}.

| label | precision | recall | F1 | support |
|---|---|---|---|---|
{rows}

## Serving
`model.pt` (TorchScript) takes `image` float32 N x C x H x W, preprocessed by
`services/runtime/preprocessing.py` with `serving_spec.json`'s spec, and returns `logits` and `embedding`.
`sha256.json` lists the hash of every file.
"""
