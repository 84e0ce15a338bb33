"""Training, evaluation and batched prediction of the trainer's networks: plain torch, no broker, no MLflow.

``train`` fits a network from ``services.trainer.model`` on preprocessed arrays (float32 N x C x H x W, labels
int64 indices) with the model policy's hyperparameters:

- Reproducible: python's ``random``, numpy's and torch's global RNGs are seeded with ``hp.seed``, shuffling
  draws from its own seeded generator, and deterministic algorithms are switched on for the duration of the
  call (cuDNN deterministic, no benchmark autotuning; ``warn_only`` so an op without a deterministic kernel
  warns rather than fails). A rerun on the same data, device and thread count gives the same metrics. Build
  the model with ``build_model(..., seed=hp.seed)`` so the initial weights are reproducible too. The global
  flags are restored on return.
- Device: CUDA when present (or ``device=``), with automatic mixed precision: bf16 where the GPU supports it,
  otherwise fp16 with a GradScaler; channels-last activations. The CPU trains in fp32.
  ``torch.set_num_threads`` is left to the caller.
- Class imbalance: a class-weighted cross-entropy, each class weighted by n / (k * count) over the k classes
  present in the training split ("balanced" weights), so every class contributes equally to the loss; the
  validation loss uses the same weights. The loss is written with a one-hot product rather than NLLLoss,
  whose CUDA kernel is not deterministic.
- AdamW (weight decay 1e-2) with a cosine learning-rate schedule over ``hp.epochs``.
- Early stopping on the validation loss: after ``hp.early_stopping_patience`` epochs without improvement
  training stops (0: never stops early); the weights of the best epoch are restored either way.
- ``on_epoch`` is called after every epoch with an ``EpochResult`` (for MLflow metrics, and to keep a
  JetStream message alive); an exception raised there stops training and propagates.
- Efficient: the arrays become tensors once (on the GPU when they fit in a quarter of its free memory,
  otherwise gathered into pinned buffers and copied asynchronously), losses are summed on the device and read
  once per epoch, and no per-batch Python beyond the step itself.

Unusable data raises ``ValueError`` with what is needed (``check_data``), before any training.
"""

from __future__ import annotations

import math
import os
import random
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:  # only a type here: bench/gpu.py runs this module on a machine with torch alone
    from contracts.kv import Hyperparameters

__all__ = [
    "MIN_TRAIN_IMAGES",
    "EpochResult",
    "TrainResult",
    "TrainingDiverged",
    "check_data",
    "class_weights",
    "evaluate",
    "metrics_from_predictions",
    "predict",
    "resolve_device",
    "seed_everything",
    "train",
]

MIN_TRAIN_IMAGES = 10
"""Fewer training images than this is no dataset to train on."""

WEIGHT_DECAY = 1e-2
MIN_DELTA = 1e-6
"""A validation loss must fall by more than this to count as an improvement."""

Split = tuple[np.ndarray, np.ndarray]


class TrainingDiverged(RuntimeError):
    """The training loss became NaN or infinite (usually: the learning rate is too high)."""


@dataclass(frozen=True)
class EpochResult:
    epoch: int
    """1-based."""
    train_loss: float
    val_loss: float
    val_accuracy: float
    images_per_s: float
    """training images per second in this epoch (forward, backward and step; validation excluded)"""
    seconds: float
    """the epoch's wall time, validation included"""
    learning_rate: float
    """the learning rate the epoch trained with"""
    best: bool
    """the validation loss improved on every earlier epoch"""

    def as_metrics(self) -> dict[str, float]:
        """The numbers to log per epoch (MLflow ``log_metrics(..., step=epoch)``)."""
        return {
            "train_loss": self.train_loss,
            "val_loss": self.val_loss,
            "val_accuracy": self.val_accuracy,
            "images_per_s": self.images_per_s,
            "epoch_seconds": self.seconds,
            "learning_rate": self.learning_rate,
        }


@dataclass(frozen=True)
class TrainResult:
    best_epoch: int
    """the epoch whose weights the model now holds (1-based)"""
    epochs_run: int
    stopped_early: bool
    best_val_loss: float
    best_val_accuracy: float
    seconds: float
    """wall time of the whole call"""
    images_per_s: float
    """training images per second over all epochs (training steps only)"""
    device: str
    """e.g. ``cpu`` or ``cuda:0 (NVIDIA H100 80GB HBM3)``"""
    precision: str
    """``fp32``, ``bf16-amp`` or ``fp16-amp``"""
    num_classes: int
    train_images: int
    val_images: int
    class_weights: list[float]
    model: nn.Module = field(repr=False, compare=False)
    """the trained model itself (the one passed in, now holding the best epoch's weights)"""
    history: list[EpochResult] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """Everything but the model, as plain values (history as a list of dicts)."""
        values = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("model", "history")}
        return {**values, "history": [asdict(epoch) for epoch in self.history]}


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``device`` as a torch.device; None picks CUDA when available, else the CPU."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} was asked for but CUDA is not available")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def _describe(dev: torch.device) -> str:
    return f"{dev} ({torch.cuda.get_device_name(dev)})" if dev.type == "cuda" else str(dev)


def seed_everything(seed: int) -> None:
    """Seed python's ``random``, numpy's global RNG and torch's (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextmanager
def _deterministic(enabled: bool, dev: torch.device) -> Iterator[None]:
    """Deterministic algorithms for the duration, restoring the global flags afterwards."""
    saved = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.deterministic,
        torch.backends.cudnn.benchmark,
        torch.utils.deterministic.fill_uninitialized_memory,  # type: ignore[attr-defined]
    )
    try:
        if enabled:
            if dev.type == "cuda":
                # cuBLAS reads this when it creates its handle: effective unless CUDA was used before.
                os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.utils.deterministic.fill_uninitialized_memory = False  # type: ignore[attr-defined]
            torch.backends.cudnn.deterministic = True
            torch.backends.cudnn.benchmark = False
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        torch.backends.cudnn.deterministic = saved[2]
        torch.backends.cudnn.benchmark = saved[3]
        torch.utils.deterministic.fill_uninitialized_memory = saved[4]  # type: ignore[attr-defined]


def _as_arrays(split: Split, name: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        images, labels = split
    except (TypeError, ValueError):
        raise ValueError(f"the {name} split must be a pair (images, labels)") from None
    images, labels = np.asarray(images), np.asarray(labels)
    if images.ndim != 4:
        raise ValueError(
            f"{name} images must be one preprocessed array N x C x H x W, got shape {images.shape}"
        )
    if not np.issubdtype(images.dtype, np.floating):
        raise ValueError(f"{name} images must be preprocessed float32 arrays, got dtype {images.dtype}")
    if labels.ndim != 1 or len(labels) != len(images):
        raise ValueError(
            f"{name} labels must be one integer per image: "
            f"{len(images)} images, labels of shape {labels.shape}"
        )
    if len(labels) and not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{name} labels must be integer class indices, got dtype {labels.dtype}")
    return np.ascontiguousarray(images, dtype=np.float32), labels.astype(np.int64, copy=False)


def _all_finite(images: np.ndarray, chunk: int = 1024) -> bool:
    return all(bool(np.isfinite(images[i : i + chunk]).all()) for i in range(0, len(images), chunk))


def check_data(train: Split, val: Split, num_classes: int | None = None) -> None:
    """Raise ValueError, saying what is needed, when the splits can't train a classifier.

    Needs: at least ``MIN_TRAIN_IMAGES`` training images of at least 2 classes, at least one validation image,
    the same image shape (C x H x W) in both splits, finite pixel values, and labels within 0..num_classes-1.
    """
    x_train, y_train = _as_arrays(train, "training")
    x_val, y_val = _as_arrays(val, "validation")
    if len(x_train) < MIN_TRAIN_IMAGES:
        raise ValueError(
            f"too few training images: {len(x_train)}; training needs at least {MIN_TRAIN_IMAGES} "
            "(add images to the dataset)"
        )
    classes, counts = np.unique(y_train, return_counts=True)
    if len(classes) < 2:
        raise ValueError(
            f"the training split has images of only {len(classes)} label (class index {int(classes[0])}, "
            f"{int(counts[0])} images); a classifier needs images of at least 2 labels"
        )
    if len(x_val) == 0:
        raise ValueError(
            "the validation split is empty; training needs at least 1 validation image for early stopping "
            "and model selection (add images, or split differently)"
        )
    if x_train.shape[1:] != x_val.shape[1:]:
        raise ValueError(
            f"training images are {x_train.shape[1:]} (C x H x W) but validation images are {x_val.shape[1:]}"
        )
    for name, y in (("training", y_train), ("validation", y_val)):
        low, high = int(y.min()), int(y.max())
        if low < 0 or (num_classes is not None and high >= num_classes):
            limit = f"0..{num_classes - 1}" if num_classes is not None else "0 or more"
            raise ValueError(f"{name} labels must be class indices {limit}, found {low}..{high}")
    for name, x in (("training", x_train), ("validation", x_val)):
        if not _all_finite(x):
            raise ValueError(f"{name} images contain NaN or infinite values after preprocessing")


def class_weights(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Balanced class weights n / (k * count) over the k classes present; 0 for absent classes."""
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    present = counts > 0
    weights = np.zeros(num_classes, dtype=np.float64)
    weights[present] = len(labels) / (present.sum() * counts[present])
    return weights.astype(np.float32)


def _weighted_cross_entropy(logits: Tensor, target: Tensor, weights: Tensor) -> Tensor:
    """Class-weighted mean cross-entropy as a one-hot product: elementwise ops only, deterministic on CUDA."""
    log_probs = F.log_softmax(logits.float(), dim=1)
    classes = torch.arange(log_probs.shape[1], device=target.device)
    one_hot = (target[:, None] == classes[None, :]).to(log_probs.dtype)
    per_sample = weights[target]
    nll = -(log_probs * one_hot).sum(dim=1)
    return (nll * per_sample).sum() / per_sample.sum().clamp_min(1e-12)


def _model_device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _forward_shapes(model: nn.Module, example: np.ndarray, dev: torch.device) -> tuple[int, int]:
    """(K, D) from one eval-mode forward pass, with a clear error when the images don't fit the model."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            logits, embedding = model(torch.from_numpy(example[:2]).to(dev))
    except RuntimeError as exc:
        raise ValueError(
            f"images of shape {example.shape[1:]} (C x H x W) don't fit the model: {exc}"
        ) from exc
    finally:
        model.train(was_training)
    return int(logits.shape[1]), int(embedding.shape[1])


def _autocast_dtype(dev: torch.device) -> torch.dtype | None:
    if dev.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def _autocast(dev: torch.device, dtype: torch.dtype | None) -> AbstractContextManager[Any]:
    return torch.autocast(dev.type, dtype=dtype) if dtype is not None else nullcontext()


def _fits_on_device(nbytes: int, dev: torch.device) -> bool:
    if dev.type != "cuda":
        return True
    free, _total = torch.cuda.mem_get_info(dev)
    return nbytes <= free // 4


class _Batches:
    """Shuffled training batches as device tensors, with as little work per batch as possible."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, dev: torch.device, batch_size: int) -> None:
        self.dev = dev
        self.n = len(images)
        self.batch_size = min(batch_size, self.n)
        host = torch.from_numpy(images)
        self.on_device = _fits_on_device(images.nbytes, dev)
        self.images = host.to(dev) if self.on_device else host
        self.labels = torch.from_numpy(labels).to(dev)
        self.channels_last = dev.type == "cuda"
        self.pinned: list[Tensor] = []
        self.events: list[torch.cuda.Event] = []
        if not self.on_device:
            shape = (self.batch_size, *images.shape[1:])
            self.pinned = [torch.empty(shape, dtype=torch.float32).pin_memory() for _ in range(2)]
            self.events = [torch.cuda.Event(), torch.cuda.Event()]

    def epoch(self, generator: torch.Generator) -> Iterator[tuple[Tensor, Tensor]]:
        order = torch.randperm(self.n, generator=generator)
        starts = list(range(0, self.n, self.batch_size))
        if self.n > 1 and self.n - starts[-1] == 1:
            starts.pop()  # a batch of one image can't train BatchNorm: leave that image for the next epoch
            stops = [*starts[1:], self.n - 1]
        else:
            stops = [*starts[1:], self.n]
        device_order = order.to(self.dev)
        for i, (start, stop) in enumerate(zip(starts, stops, strict=True)):
            index = device_order[start:stop]
            if self.on_device:
                images = self.images.index_select(0, index)
            else:
                slot = i % 2
                self.events[slot].synchronize()  # the copy out of this buffer two batches ago is done
                buffer = self.pinned[slot][: stop - start]
                torch.index_select(self.images, 0, order[start:stop], out=buffer)
                images = buffer.to(self.dev, non_blocking=True)
                self.events[slot].record()
            if self.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            yield images, self.labels.index_select(0, index)


def _chunks(images: np.ndarray, batch_size: int, dev: torch.device) -> Iterator[Tensor]:
    for start in range(0, len(images), batch_size):
        batch = torch.from_numpy(images[start : start + batch_size]).to(dev, non_blocking=False)
        if dev.type == "cuda":
            batch = batch.contiguous(memory_format=torch.channels_last)
        yield batch


def _validate(
    model: nn.Module,
    images: np.ndarray,
    labels: Tensor,
    weights: Tensor,
    batch_size: int,
    amp_dtype: torch.dtype | None,
) -> tuple[float, float]:
    """(weighted mean loss, accuracy) on the validation split, in eval mode."""
    model.eval()
    dev = labels.device
    nll_sum = torch.zeros((), device=dev, dtype=torch.float64)
    weight_sum = torch.zeros((), device=dev, dtype=torch.float64)
    correct = torch.zeros((), device=dev, dtype=torch.int64)
    with torch.inference_mode(), _autocast(dev, amp_dtype):
        for start, batch in zip(
            range(0, len(images), batch_size), _chunks(images, batch_size, dev), strict=True
        ):
            target = labels[start : start + len(batch)]
            logits, _ = model(batch)
            log_probs = F.log_softmax(logits.float(), dim=1)
            nll = -log_probs.gather(1, target[:, None]).squeeze(1)
            w = weights[target]
            nll_sum += (nll * w).sum()
            weight_sum += w.sum()
            correct += (logits.argmax(dim=1) == target).sum()
    loss = (nll_sum / weight_sum.clamp_min(1e-12)).item()
    return loss, correct.item() / len(images)


def train(
    model: nn.Module,
    train: Split,
    val: Split,
    hp: Hyperparameters,
    *,
    device: str | torch.device | None = None,
    on_epoch: Callable[[EpochResult], None] | None = None,
    deterministic: bool = True,
) -> TrainResult:
    """Train ``model`` in place on ``train`` (images N x C x H x W float32, labels int64); select on ``val``.

    On return the model holds the weights of the best validation epoch, is in eval mode and stays on the
    training device. See the module docstring for seeds, precision, class weights and early stopping.
    Raises ValueError for unusable data and ``TrainingDiverged`` when the loss becomes NaN or infinite.
    """
    began = time.perf_counter()
    x_train, y_train = _as_arrays(train, "training")
    x_val, y_val = _as_arrays(val, "validation")
    dev = resolve_device(device)
    model.to(dev)
    if dev.type == "cuda":
        model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    if len(x_train):
        num_classes, _ = _forward_shapes(model, x_train, dev)
    else:
        num_classes = None
    check_data((x_train, y_train), (x_val, y_val), num_classes)
    assert num_classes is not None
    amp_dtype = _autocast_dtype(dev)
    precision = {None: "fp32", torch.bfloat16: "bf16-amp", torch.float16: "fp16-amp"}[amp_dtype]

    with _deterministic(deterministic, dev):
        seed_everything(hp.seed)
        generator = torch.Generator().manual_seed(hp.seed)
        weights_np = class_weights(y_train, num_classes)
        weights = torch.from_numpy(weights_np).to(dev)
        batches = _Batches(x_train, y_train, dev, hp.batch_size)
        val_labels = torch.from_numpy(y_val).to(dev)
        val_batch = max(2 * hp.batch_size, 64)

        fused = dev.type == "cuda"
        optimizer = torch.optim.AdamW(
            model.parameters(), lr=hp.learning_rate, weight_decay=WEIGHT_DECAY, fused=fused
        )
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=hp.epochs)
        scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None

        history: list[EpochResult] = []
        best_loss, best_accuracy, best_epoch = math.inf, 0.0, 0
        best_state: dict[str, Tensor] | None = None
        images_seen, train_seconds = 0, 0.0
        stopped_early = False
        for epoch in range(1, hp.epochs + 1):
            epoch_began = time.perf_counter()
            learning_rate = float(optimizer.param_groups[0]["lr"])
            model.train()
            loss_sum = torch.zeros((), device=dev, dtype=torch.float32)
            seen = 0
            for images, target in batches.epoch(generator):
                with _autocast(dev, amp_dtype):
                    logits, _ = model(images)
                loss = _weighted_cross_entropy(logits, target, weights)
                optimizer.zero_grad(set_to_none=True)
                if scaler is not None:
                    scaler.scale(loss).backward()
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    loss.backward()
                    optimizer.step()
                loss_sum += loss.detach() * len(target)
                seen += len(target)
            train_loss = loss_sum.item() / seen  # the one synchronisation of the epoch
            trained = time.perf_counter() - epoch_began
            schedule.step()
            if not math.isfinite(train_loss):
                raise TrainingDiverged(
                    f"the training loss became {train_loss} in epoch {epoch}; "
                    f"lower the learning rate (now {hp.learning_rate})"
                )
            images_seen += seen
            train_seconds += trained

            val_loss, val_accuracy = _validate(model, x_val, val_labels, weights, val_batch, amp_dtype)
            improved = val_loss < best_loss - MIN_DELTA
            if improved:
                best_loss, best_accuracy, best_epoch = val_loss, val_accuracy, epoch
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            result = EpochResult(
                epoch=epoch,
                train_loss=train_loss,
                val_loss=val_loss,
                val_accuracy=val_accuracy,
                images_per_s=seen / trained if trained > 0 else 0.0,
                seconds=time.perf_counter() - epoch_began,
                learning_rate=learning_rate,
                best=improved,
            )
            history.append(result)
            if on_epoch is not None:
                on_epoch(result)
            patience = hp.early_stopping_patience
            if patience and epoch - best_epoch >= patience and epoch < hp.epochs:
                stopped_early = True
                break

        if best_state is not None:
            model.load_state_dict(best_state)
        else:  # every validation loss was NaN: keep the last weights, report the last epoch
            best_epoch = len(history)
            best_loss, best_accuracy = history[-1].val_loss, history[-1].val_accuracy
        model.eval()

    return TrainResult(
        best_epoch=best_epoch,
        epochs_run=len(history),
        stopped_early=stopped_early,
        best_val_loss=best_loss,
        best_val_accuracy=best_accuracy,
        seconds=time.perf_counter() - began,
        images_per_s=images_seen / train_seconds if train_seconds > 0 else 0.0,
        device=_describe(dev),
        precision=precision,
        num_classes=num_classes,
        train_images=len(x_train),
        val_images=len(x_val),
        class_weights=[float(w) for w in weights_np],
        model=model,
        history=history,
    )


def predict(
    model: nn.Module,
    images: np.ndarray,
    *,
    batch_size: int = 256,
    device: str | torch.device | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(logits N x K, embeddings N x D) as float32 numpy arrays, in eval mode, fp32, ``batch_size`` at a time.

    Runs where the model's parameters are unless ``device`` is given (the model is moved there). The model's
    train/eval mode is restored afterwards.
    """
    x = np.asarray(images)
    if x.ndim != 4:
        raise ValueError(f"images must be one preprocessed array N x C x H x W, got shape {x.shape}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    dev = resolve_device(device) if device is not None else _model_device(model)
    model.to(dev)
    was_training = model.training
    model.eval()
    logits_out: list[np.ndarray] = []
    embeddings_out: list[np.ndarray] = []
    try:
        with torch.inference_mode():
            for batch in _chunks(x, batch_size, dev):
                logits, embedding = model(batch)
                logits_out.append(logits.float().cpu().numpy())
                embeddings_out.append(embedding.float().cpu().numpy())
    finally:
        model.train(was_training)
    if not logits_out:
        k = int(getattr(getattr(model, "classifier", None), "out_features", 0))
        d = int(getattr(getattr(model, "classifier", None), "in_features", 0))
        return np.zeros((0, k), np.float32), np.zeros((0, d), np.float32)
    return np.concatenate(logits_out), np.concatenate(embeddings_out)


def metrics_from_predictions(y_true: np.ndarray, y_pred: np.ndarray, labels: list[str]) -> dict[str, Any]:
    """Accuracy, macro F1 and per-label precision/recall/F1/support of predicted class indices.

    Macro F1 averages over the labels that occur in ``y_true`` or ``y_pred`` (as scikit-learn does), so a
    label with no images in the split does not count as a failure. Per-label values are 0 where undefined.
    ``confusion[i][j]`` counts images of label i predicted as label j.
    """
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    k = len(labels)
    if len(y_true) != len(y_pred):
        raise ValueError(f"{len(y_true)} true labels but {len(y_pred)} predictions")
    if len(y_true) and (min(y_true.min(), y_pred.min()) < 0 or max(y_true.max(), y_pred.max()) >= k):
        raise ValueError(f"class indices must be within 0..{k - 1} for {k} labels")
    confusion = np.bincount(y_true * k + y_pred, minlength=k * k).reshape(k, k)
    true_positives = np.diag(confusion).astype(np.float64)
    support = confusion.sum(axis=1)
    predicted = confusion.sum(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(predicted > 0, true_positives / predicted, 0.0)
        recall = np.where(support > 0, true_positives / support, 0.0)
        denominator = precision + recall
        f1 = np.where(denominator > 0, 2 * precision * recall / denominator, 0.0)
    occurring = (support > 0) | (predicted > 0)
    return {
        "count": len(y_true),
        "accuracy": float(true_positives.sum() / len(y_true)) if len(y_true) else 0.0,
        "macro_f1": float(f1[occurring].mean()) if occurring.any() else 0.0,
        "per_class": {
            label: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i, label in enumerate(labels)
        },
        "confusion": confusion.tolist(),
    }


def evaluate(
    model: nn.Module, images: np.ndarray, labels_true: np.ndarray, labels: list[str], *, batch_size: int = 256
) -> dict[str, Any]:
    """``metrics_from_predictions`` of the model's argmax on ``images``; ``labels`` names the K classes.

    The keys map onto ``contracts.events.TrainMetrics``: ``accuracy`` (val_/test_accuracy), ``macro_f1``
    (test_macro_f1) and ``per_class`` (label -> ``ClassMetrics`` fields); ``count`` and ``confusion`` are
    extra.
    """
    logits, _ = predict(model, images, batch_size=batch_size)
    if logits.shape[1] != len(labels):
        raise ValueError(f"the model has {logits.shape[1]} outputs but {len(labels)} labels were given")
    return metrics_from_predictions(np.asarray(labels_true), logits.argmax(axis=1), labels)
