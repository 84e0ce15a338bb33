"""The trainer's model artifacts: TorchScript, ONNX, the reference profile for drift, and their sha256.

Every exported model takes ``image`` (float32, N x C x H x W, preprocessed) and returns ``(logits N x K,
embedding N x D)``; ONNX names the outputs ``logits`` and ``embedding``. Exports run on a CPU copy in eval
mode and in fp32, so the in-memory model (on whatever device) is left as it was.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from services.runtime.telemetry import get_logger

__all__ = [
    "CONFIDENCE_BINS",
    "INPUT_NAME",
    "ONNX_OPSET",
    "OUTPUT_NAMES",
    "PROFILE_VERSION",
    "export_onnx",
    "export_torchscript",
    "reference_profile",
    "serving_spec",
    "sha256_file",
]

INPUT_NAME = "image"
OUTPUT_NAMES = ("logits", "embedding")
ONNX_OPSET = 17
CONFIDENCE_BINS = 20
PROFILE_VERSION = 1
QUANTILES = (0.0, 0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 1.0)
TOLERANCE = 1e-4
"""Largest difference allowed between an exported model's logits and the in-memory model's on the example."""

log = get_logger(component="trainer.export")


def serving_spec(
    image_shape: Sequence[int],
    labels: list[str],
    embedding_dim: int,
    *,
    onnx: bool,
    max_batch_size: int,
    preprocessing: dict[str, Any],
) -> dict[str, Any]:
    """``serving_spec.json``: the exported files, their tensors (batch dimension -1) and the preprocessing,
    from which serving renders the Triton config of its backend (``services/serving/tritonconfig.py``)."""
    c, h, w = (int(n) for n in image_shape)  # C x H x W
    return {
        "format": "torchscript",
        "files": {"torchscript": "model.pt", **({"onnx": "model.onnx"} if onnx else {})},
        "inputs": [{"name": INPUT_NAME, "dtype": "float32", "shape": [-1, c, h, w]}],
        "outputs": [
            {"name": OUTPUT_NAMES[0], "dtype": "float32", "shape": [-1, len(labels)]},
            {"name": OUTPUT_NAMES[1], "dtype": "float32", "shape": [-1, int(embedding_dim)]},
        ],
        "max_batch_size": max_batch_size,
        "preprocessing": preprocessing,
        "labels": labels,
    }


def _cpu_copy(model: nn.Module) -> nn.Module:
    clone = copy.deepcopy(model).to("cpu").float()
    clone.to(memory_format=torch.contiguous_format)  # type: ignore[call-overload]
    return clone.eval()


def _example_tensor(example: np.ndarray, min_batch: int = 1) -> torch.Tensor:
    x = np.ascontiguousarray(np.asarray(example), dtype=np.float32)
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4 or len(x) == 0:
        raise ValueError(f"the example must be a preprocessed image batch N x C x H x W, got shape {x.shape}")
    if len(x) < min_batch:
        x = np.concatenate([x] * min_batch)[:min_batch]
    return torch.from_numpy(x)


def export_torchscript(model: nn.Module, example: np.ndarray, path: Path) -> Path:
    """Save a TorchScript copy of ``model`` (CPU, eval, fp32) to ``path`` with ``torch.jit.save``.

    Scripted where possible (any batch size and image size), traced on ``example`` otherwise. The file is
    loaded back and checked against the in-memory model on ``example`` (logits within 1e-4) before returning.
    """
    cpu = _cpu_copy(model)
    x = _example_tensor(example)
    with warnings.catch_warnings():
        # torch 2.13 marks torch.jit deprecated; TorchScript is still what Triton's backends load.
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.", category=DeprecationWarning)
        module, how = _script_or_trace(cpu, x)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.jit.save(module, str(path))
        loaded = torch.jit.load(str(path), map_location="cpu")
    with torch.inference_mode():
        expected, _ = cpu(x)
        got, embedding = loaded(x)
    difference = float((expected - got).abs().max())
    if difference > TOLERANCE or embedding.shape[0] != x.shape[0]:
        raise RuntimeError(f"the saved TorchScript differs from the model: max logit difference {difference}")
    log.info("torchscript_exported", path=str(path), how=how, max_logit_difference=difference)
    return path


def _script_or_trace(cpu: nn.Module, x: torch.Tensor) -> tuple[torch.jit.ScriptModule, str]:
    try:
        module: torch.jit.ScriptModule = torch.jit.script(cpu)
        how = "script"
    except Exception as exc:  # any scripting failure: tracing still gives a usable module for this input
        log.warning("torchscript_script_failed", reason=str(exc).splitlines()[0], fallback="trace")
        module = torch.jit.trace(cpu, (x,), check_trace=False)
        how = "trace"
    return module, how


def export_onnx(model: nn.Module, example: np.ndarray, path: Path, *, opset: int = ONNX_OPSET) -> bool:
    """Write ``model`` as ONNX (input ``image``, outputs ``logits`` and ``embedding``, dynamic batch axis).

    Needs the ``onnx`` package. Tries torch's TorchScript-based exporter at ``opset`` first (fast, exactly
    that opset), then, where ``onnxscript`` is installed, the exporter based on torch.export (opset 18 or
    more, its native one). The file is checked with ``onnx.checker`` and, where onnxruntime is installed,
    its outputs are compared with the model's at two batch sizes. Returns False, with the reasons logged,
    when no exporter wrote a good file: ONNX is an optional artifact and never fails a training.
    """
    path = Path(path)
    if importlib.util.find_spec("onnx") is None:
        log.warning("onnx_export_skipped", reason="the onnx package is not installed")
        return False
    import onnx

    cpu = _cpu_copy(model)
    x = _example_tensor(example, min_batch=2)  # a batch of 1 would be specialised to 1 by torch.export
    path.parent.mkdir(parents=True, exist_ok=True)
    reasons: list[str] = []
    for how in ("torchscript", "dynamo"):
        if how == "dynamo" and importlib.util.find_spec("onnxscript") is None:
            reasons.append("dynamo: the onnxscript package is not installed")
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript-based exporter's
                _export(how, cpu, x, path, opset)
            onnx.checker.check_model(str(path))
            difference = _onnxruntime_difference(cpu, x, path)
            if difference is not None and difference > TOLERANCE:
                raise ValueError(f"onnxruntime's logits differ from torch's by {difference}")
        except Exception as exc:  # any exporter failure: note it, try the next, never fail the training
            reasons.append(
                f"{how}: {type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
            )
            path.unlink(missing_ok=True)
            continue
        written = max(
            o.version
            for o in onnx.load(str(path), load_external_data=False).opset_import
            if o.domain in ("", "ai.onnx")
        )
        log.info("onnx_exported", path=str(path), how=how, opset=written, max_logit_difference=difference)
        return True
    log.warning("onnx_export_failed", reason="; ".join(reasons))
    return False


def _export(how: str, model: nn.Module, x: torch.Tensor, path: Path, opset: int) -> None:
    if how == "torchscript":
        torch.onnx.export(
            model,
            (x,),
            str(path),
            input_names=[INPUT_NAME],
            output_names=list(OUTPUT_NAMES),
            opset_version=opset,
            dynamo=False,
            dynamic_axes={name: {0: "batch"} for name in (INPUT_NAME, *OUTPUT_NAMES)},
        )
    else:
        torch.onnx.export(
            model,
            (x,),
            str(path),
            input_names=[INPUT_NAME],
            output_names=list(OUTPUT_NAMES),
            opset_version=max(opset, 18),
            dynamo=True,
            dynamic_shapes={INPUT_NAME: {0: torch.export.Dim("batch", min=1)}},
            external_data=False,
            optimize=True,
            verbose=False,
        )


def _onnxruntime_difference(model: nn.Module, x: torch.Tensor, path: Path) -> float | None:
    """The largest logit difference of onnxruntime from torch on ``x`` and on one more image than ``x``.

    None without onnxruntime; infinite when the output shapes are wrong.
    """
    if importlib.util.find_spec("onnxruntime") is None:
        return None
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    difference = 0.0
    for batch in (x, torch.cat([x, x[:1]])):  # a second batch size proves the batch axis is dynamic
        with torch.inference_mode():
            expected, _ = model(batch)
        logits, embedding = session.run(list(OUTPUT_NAMES), {INPUT_NAME: batch.numpy()})
        if logits.shape != tuple(expected.shape) or embedding.shape[0] != len(batch):
            return math.inf
        difference = max(difference, float(np.abs(logits - expected.numpy()).max()))
    return difference


def sha256_file(path: Path) -> str:
    """The hex sha256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


def _floats(values: np.ndarray, digits: int = 6) -> list[Any]:
    return np.round(values.astype(np.float64), digits).tolist()


def _summary(values: np.ndarray) -> dict[str, Any]:
    return {
        "count": len(values),
        "mean": float(values.mean()),
        "std": float(values.std()),
        "quantiles": {
            str(q): float(v) for q, v in zip(QUANTILES, np.quantile(values, QUANTILES), strict=True)
        },
    }


def reference_profile(
    logits: np.ndarray,
    embeddings: np.ndarray,
    labels: list[str],
    image_stats: list[dict[str, Any]] | None = None,
    sample: int = 512,
    seed: int = 0,
    *,
    stats_sample: int = 5000,
) -> dict[str, Any]:
    """What the monitor compares live traffic with, as a JSON-serialisable dict (no NaN, plain Python types).

    From the model's outputs on reference images (the validation or test split):

    - ``labels``, ``count``, ``seed``, ``version`` (of this layout)
    - ``class_counts`` / ``class_frequencies``: label -> predictions (argmax) of that label / their fraction
    - ``confidence``: the max softmax probability: ``edges`` (``CONFIDENCE_BINS`` + 1 equal bins over 0..1),
      ``counts`` and ``frequencies`` per bin, ``mean``, ``std``, ``quantiles``
    - ``image_stats``: per numeric feature of ``image_stats`` (e.g. mean, std, contrast, sharpness, one dict
      per image): ``values`` (a seeded sample of at most ``stats_sample``, for KS tests) and ``count``,
      ``mean``, ``std``, ``quantiles`` over all of them; empty when ``image_stats`` is None
    - ``embeddings``: ``dim``, ``count`` (sampled), ``indices`` (rows taken), ``values`` (a seeded sample of
      at most ``sample`` embeddings, for MMD tests), ``mean`` and ``std`` per dimension over all rows

    Floats are rounded to 6 decimals; the same inputs and seed give the same profile.
    """
    logits = np.asarray(logits, dtype=np.float64)
    embeddings = np.asarray(embeddings, dtype=np.float64)
    if logits.ndim != 2 or logits.shape[1] != len(labels):
        raise ValueError(f"logits must be N x {len(labels)} (one column per label), got shape {logits.shape}")
    if embeddings.ndim != 2 or len(embeddings) != len(logits):
        raise ValueError(f"embeddings must be N x D with N = {len(logits)}, got shape {embeddings.shape}")
    if len(logits) == 0:
        raise ValueError("a reference profile needs at least one image")
    if not (np.isfinite(logits).all() and np.isfinite(embeddings).all()):
        raise ValueError("logits and embeddings must be finite")
    rng = np.random.default_rng(seed)
    n = len(logits)

    probabilities = _softmax(logits)
    predictions = probabilities.argmax(axis=1)
    counts = np.bincount(predictions, minlength=len(labels))
    confidence = probabilities.max(axis=1)
    edges = np.linspace(0.0, 1.0, CONFIDENCE_BINS + 1)
    bin_counts, _ = np.histogram(confidence, bins=edges)

    stats: dict[str, Any] = {}
    if image_stats:
        features = sorted(
            {
                key
                for row in image_stats
                for key, value in row.items()
                if isinstance(value, int | float) and not isinstance(value, bool)
            }
        )
        for feature in features:
            values = np.array(
                [float(row[feature]) for row in image_stats if isinstance(row.get(feature), int | float)]
            )
            values = values[np.isfinite(values)]
            if len(values) == 0:
                continue
            taken = values if len(values) <= stats_sample else rng.choice(values, stats_sample, replace=False)
            stats[feature] = {**_summary(values), "values": _floats(taken)}

    rows = np.arange(n) if n <= sample else np.sort(rng.choice(n, sample, replace=False))
    profile = {
        "version": PROFILE_VERSION,
        "labels": list(labels),
        "count": n,
        "seed": seed,
        "class_counts": {label: int(c) for label, c in zip(labels, counts, strict=True)},
        "class_frequencies": {label: round(float(c) / n, 6) for label, c in zip(labels, counts, strict=True)},
        "confidence": {
            "bins": CONFIDENCE_BINS,
            "edges": _floats(edges),
            "counts": [int(c) for c in bin_counts],
            "frequencies": _floats(bin_counts / n),
            **_summary(confidence),
        },
        "image_stats": stats,
        "embeddings": {
            "dim": int(embeddings.shape[1]),
            "count": len(rows),
            "indices": [int(i) for i in rows],
            "values": _floats(embeddings[rows]),
            "mean": _floats(embeddings.mean(axis=0)),
            "std": _floats(embeddings.std(axis=0)),
        },
    }
    return profile
