"""Measuring an exported model for the gates: load it, smoke it, time it, and evaluate it on a test split.

The adapter behind ``services.registry.gates``. It reads what the trainer exports under a run's
``model/`` folder (see ``services.trainer.pipeline``): ``model.pt``, a TorchScript taking ``image`` (float32
N x C x H x W, already preprocessed) and returning ``(logits N x K, embedding N x D)``, and
``serving_spec.json`` with the inputs, outputs, ``preprocessing`` (a ``PreprocessSpec``) and ``labels``
(index i is class i).

- ``download_model_dir`` fetches the ``model/`` folder of a run and checks each file's sha256 against what
  ``model.trained`` announced.
- ``LoadedModel.load`` reads the spec and loads the TorchScript on the CPU (``ModelLoadError`` when it
  cannot); ``smoke_load`` does the same but reports a failure as a ``SmokeResult``.
- ``smoke`` runs a random batch of 2 and checks every output against the spec: names, shapes (logits N x K
  with K = the number of labels), dtype, finite values.
- ``latency_p50_ms`` times batch-1 inference on the CPU. ``torch.set_num_threads`` is left to the caller, so
  the registry measures under the thread count it chooses (and reports).
- ``evaluate_on`` computes ``TrainMetrics`` on labelled files exactly as the trainer does: the shared
  ``preprocess_batch`` with the model's own spec, the argmax of the logits, and the trainer's
  ``metrics_from_predictions``. The files are treated as one test split, so ``val_accuracy`` is set to the
  same accuracy as ``test_accuracy``. A file whose label the model does not know (a label the model was not
  trained on) counts as wrong: that label is added after the model's labels, so it has recall 0, appears in
  ``per_class``, and counts in macro F1 as an F1 of 0.
"""

from __future__ import annotations

import json
import statistics
import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from contracts.events import ClassMetrics, TrainMetrics
from services.registry.gates import SmokeResult
from services.runtime.artifacts import MODEL_DIR, ArtifactClient, ArtifactMismatch, download_model_dir
from services.runtime.preprocessing import ImageInput, PreprocessSpec, preprocess_batch
from services.trainer.training import metrics_from_predictions

if TYPE_CHECKING:
    from services.runtime.datasets import DatasetFiles

__all__ = [
    "MODEL_DIR",
    "SPEC_FILE",
    "ArtifactClient",
    "ArtifactMismatch",
    "LoadedModel",
    "ModelLoadError",
    "TensorSpec",
    "download_model_dir",
    "evaluate_on",
    "latency_p50_ms",
    "smoke",
    "smoke_load",
    "split_files",
]

SPEC_FILE = "serving_spec.json"
SMOKE_BATCH = 2


class ModelLoadError(ValueError):
    """The model folder cannot be used: a missing or invalid serving spec, or a model.pt torch cannot load."""


@dataclass(frozen=True)
class TensorSpec:
    """One input or output of the serving spec; -1 in ``shape`` is a free (batch) dimension."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    def matches(self, shape: Sequence[int]) -> bool:
        return len(shape) == len(self.shape) and all(
            want in (-1, got) for want, got in zip(self.shape, shape, strict=True)
        )


@dataclass(frozen=True)
class LoadedModel:
    """An exported model on the CPU, with the serving spec it was published with."""

    directory: Path
    module: torch.jit.ScriptModule
    preprocessing: PreprocessSpec
    labels: tuple[str, ...]
    input: TensorSpec
    outputs: tuple[TensorSpec, ...]
    max_batch_size: int | None

    @classmethod
    def load(cls, model_dir: Path) -> LoadedModel:
        """Read ``serving_spec.json`` and load its TorchScript on the CPU, in eval mode.

        Checks the spec's structure: format ``torchscript``, one input whose shape is ``[-1, channels, size,
        size]`` of its preprocessing, outputs with names and shapes including ``logits``, and labels. Whether
        the model's outputs agree with the spec is ``smoke``'s check. Raises ``ModelLoadError``.
        """
        model_dir = Path(model_dir)
        spec_path = model_dir / SPEC_FILE
        try:
            spec = json.loads(spec_path.read_text())
        except FileNotFoundError:
            raise ModelLoadError(f"{spec_path} is missing: not a model folder the trainer exported") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ModelLoadError(f"{spec_path} cannot be read as JSON: {exc}") from exc
        try:
            parsed = _parse_spec(spec)
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelLoadError(f"{spec_path} is not a valid serving spec: {_first_line(exc)}") from exc
        preprocessing, labels, image, outputs, max_batch, filename = parsed
        module = _load_torchscript(model_dir / filename)
        return cls(model_dir, module, preprocessing, labels, image, outputs, max_batch)

    def run(self, batch: np.ndarray | torch.Tensor) -> dict[str, torch.Tensor]:
        """The model's outputs on a preprocessed batch, by the names of the spec (in the spec's order).

        Raises ``ValueError`` when the model returns another number of outputs than the spec lists.
        """
        x = torch.as_tensor(batch, dtype=torch.float32)
        with torch.inference_mode():
            result = self.module(x)
        got = result if isinstance(result, tuple | list) else (result,)
        if len(got) != len(self.outputs) or not all(isinstance(t, torch.Tensor) for t in got):
            kinds = ", ".join(type(t).__name__ for t in got)
            raise ValueError(
                f"the model returned {len(got)} value(s) ({kinds}); the serving spec lists "
                f"{len(self.outputs)} tensor(s): {', '.join(o.name for o in self.outputs)}"
            )
        return {spec.name: tensor for spec, tensor in zip(self.outputs, got, strict=True)}

    def example(self, n: int, seed: int = 0) -> torch.Tensor:
        """``n`` random inputs of the spec's shape (standard normal: what normalised images look like)."""
        p = self.preprocessing
        generator = torch.Generator().manual_seed(seed)
        return torch.randn((n, p.channels, p.size, p.size), generator=generator, dtype=torch.float32)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _tensor_spec(entry: Mapping[str, Any]) -> TensorSpec:
    name, dtype, shape = entry["name"], entry.get("dtype", "float32"), entry["shape"]
    if not isinstance(name, str) or not name:
        raise ValueError(f"a tensor name must be a non-empty string, got {name!r}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and (d == -1 or d > 0) for d in shape):
        raise ValueError(f"tensor {name!r} has shape {shape!r}: a list of positive sizes or -1")
    return TensorSpec(name=name, dtype=str(dtype), shape=tuple(shape))


def _parse_spec(
    spec: Any,
) -> tuple[PreprocessSpec, tuple[str, ...], TensorSpec, tuple[TensorSpec, ...], int | None, str]:
    if not isinstance(spec, dict):
        raise TypeError(f"it holds a JSON {type(spec).__name__}, not an object")
    if spec.get("format") != "torchscript":
        raise ValueError(f"format is {spec.get('format')!r}; the registry evaluates 'torchscript' models")
    filename = spec.get("files", {}).get("torchscript", "model.pt")
    if not isinstance(filename, str) or "/" in filename or filename in ("", ".", ".."):
        raise ValueError(f"files.torchscript must be a file name in the folder, got {filename!r}")
    preprocessing = PreprocessSpec.from_dict(spec["preprocessing"])
    labels = spec["labels"]
    if not isinstance(labels, list) or not labels or not all(isinstance(x, str) and x for x in labels):
        raise ValueError(f"labels must be a non-empty list of names, got {labels!r}")
    if len(set(labels)) != len(labels):
        raise ValueError(f"labels repeat a name: {labels}")
    inputs = [_tensor_spec(entry) for entry in spec["inputs"]]
    if len(inputs) != 1:
        raise ValueError(f"a model takes one input (image), the spec lists {len(inputs)}")
    expected = (-1, preprocessing.channels, preprocessing.size, preprocessing.size)
    if inputs[0].shape != expected:
        raise ValueError(
            f"input {inputs[0].name!r} has shape {list(inputs[0].shape)}, but its preprocessing makes "
            f"{list(expected)} (channels {preprocessing.channels}, size {preprocessing.size})"
        )
    outputs = tuple(_tensor_spec(entry) for entry in spec["outputs"])
    names = [o.name for o in outputs]
    if "logits" not in names or len(set(names)) != len(names):
        raise ValueError(f"outputs must name 'logits' once (and each output once), got {names}")
    max_batch = spec.get("max_batch_size")
    if max_batch is not None and (not isinstance(max_batch, int) or max_batch < 1):
        raise ValueError(f"max_batch_size must be a positive integer, got {max_batch!r}")
    return preprocessing, tuple(labels), inputs[0], outputs, max_batch, filename


def _load_torchscript(path: Path) -> torch.jit.ScriptModule:
    if not path.is_file():
        raise ModelLoadError(f"{path} is missing: the serving spec names it as the TorchScript")
    try:
        with warnings.catch_warnings():
            # torch 2.13 marks torch.jit deprecated; TorchScript is still what Triton loads.
            warnings.filterwarnings("ignore", message=r"`torch\.jit\.", category=DeprecationWarning)
            module = torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:  # torch raises RuntimeError, ValueError, zipfile errors... for a bad file
        raise ModelLoadError(
            f"{path.name} cannot be loaded as TorchScript ({type(exc).__name__}: {_first_line(exc)}): "
            "the file is corrupt or not a TorchScript archive"
        ) from exc
    module.eval()
    return module


# ---- smoke and latency ------------------------------------------------------------------------------------


def smoke_load(model_dir: Path) -> tuple[LoadedModel | None, SmokeResult]:
    """``LoadedModel.load`` then ``smoke``; a load failure is a failed ``SmokeResult`` (and no model)."""
    try:
        model = LoadedModel.load(model_dir)
    except ModelLoadError as exc:
        return None, SmokeResult(ok=False, detail=f"the model did not load: {exc}")
    return model, smoke(model)


def smoke(model: LoadedModel) -> SmokeResult:
    """Run a random batch of 2 inputs of the spec's shape and check every output against the spec.

    Fails (with what differs) when the model's argument is not named as the spec's input, inference raises,
    the outputs are not the spec's in number, shape or dtype, logits are not N x K for K labels, or any value
    is not finite.
    """
    argument = _argument_name(model.module)
    if argument is not None and argument != model.input.name:
        return SmokeResult(
            ok=False,
            detail=f"the model's input is named {argument!r}, the serving spec says {model.input.name!r}",
        )
    x = model.example(SMOKE_BATCH)
    try:
        outputs = model.run(x)
    except Exception as exc:  # whatever the TorchScript raises is the model failing its smoke test
        return SmokeResult(
            ok=False,
            detail=f"inference on a random batch of {SMOKE_BATCH} {_shape(x.shape)} failed: "
            f"{type(exc).__name__}: {_first_line(exc)}",
        )
    problems = []
    for spec in model.outputs:
        tensor = outputs[spec.name]
        if not spec.matches(tensor.shape) or tensor.shape[0] != SMOKE_BATCH:
            problems.append(
                f"output {spec.name!r} has shape {_shape(tensor.shape)}, the serving spec declares "
                f"{list(spec.shape)} (batch {SMOKE_BATCH})"
            )
        if str(tensor.dtype).removeprefix("torch.") != spec.dtype:
            problems.append(f"output {spec.name!r} is {tensor.dtype}, the serving spec declares {spec.dtype}")
        elif tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            problems.append(f"output {spec.name!r} has NaN or infinite values")
    logits = outputs["logits"]
    k = len(model.labels)
    if tuple(logits.shape) != (SMOKE_BATCH, k):
        problems.append(
            f"logits have shape {_shape(logits.shape)}; {SMOKE_BATCH} x {k} expected for the "
            f"{k} labels of the serving spec"
        )
    if problems:
        return SmokeResult(ok=False, detail="; ".join(dict.fromkeys(problems)))
    shapes = " and ".join(f"{name} {_shape(t.shape)}" for name, t in outputs.items())
    return SmokeResult(ok=True, detail=f"loaded; a batch of {SMOKE_BATCH} gave {shapes}, all finite")


def _argument_name(module: torch.jit.ScriptModule) -> str | None:
    try:
        arguments = getattr(module.forward, "schema").arguments  # noqa: B009 (not in torch's stubs)
    except (AttributeError, RuntimeError):
        return None
    names = [a.name for a in arguments if a.name != "self"]
    return names[0] if names else None


def _shape(shape: Iterable[int]) -> str:
    return "x".join(str(int(d)) for d in shape)


def latency_p50_ms(model: LoadedModel, runs: int = 50, warmup: int = 5) -> float:
    """Median wall time in milliseconds of ``runs`` batch-1 inferences on the CPU, after ``warmup`` more.

    Under ``torch.inference_mode``, with torch's thread count as the caller set it.
    """
    if runs < 1 or warmup < 0:
        raise ValueError(f"runs must be at least 1 and warmup at least 0, got {runs} and {warmup}")
    x = model.example(1)
    times = []
    with torch.inference_mode():
        for _ in range(warmup):
            model.module(x)
        for _ in range(runs):
            start = time.perf_counter()
            model.module(x)
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000.0


# ---- evaluation -------------------------------------------------------------------------------------------


def split_files(files: DatasetFiles, split: str = "test") -> list[tuple[Path, str]]:
    """(path, label) of one split of a fetched dataset version: what ``evaluate_on`` takes."""
    return [(f.local_path, f.label) for f in files.by_split(split)]


def evaluate_on(
    model: LoadedModel, files: Sequence[tuple[ImageInput, str]], *, batch_size: int = 64
) -> TrainMetrics:
    """The model's metrics on labelled images (``(path or bytes, label)``), computed as the trainer does.

    Images are preprocessed with the model's own spec, ``batch_size`` at a time (at most the spec's
    ``max_batch_size``). See the module docstring for ``val_accuracy`` and labels the model does not know.
    Raises ``ValueError`` for no files, and ``ImageDecodeError`` for an image that cannot be decoded.
    """
    items = list(files)
    if not items:
        raise ValueError("no images to evaluate the model on")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if model.max_batch_size is not None:
        batch_size = min(batch_size, model.max_batch_size)
    known = list(model.labels)
    names = known + sorted({label for _, label in items} - set(known))
    index = {label: i for i, label in enumerate(names)}
    y_true = np.array([index[label] for _, label in items], dtype=np.int64)
    predictions = []
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        batch = preprocess_batch([image for image, _ in chunk], model.preprocessing)
        logits = model.run(torch.from_numpy(batch))["logits"].float().numpy()
        if logits.ndim != 2 or logits.shape[1] != len(known):
            raise ValueError(
                f"the model gave logits of shape {_shape(logits.shape)} for {len(known)} labels; "
                "run the smoke test first"
            )
        predictions.append(logits.argmax(axis=1))
    m = metrics_from_predictions(y_true, np.concatenate(predictions), names)
    return TrainMetrics(
        val_accuracy=m["accuracy"],
        test_accuracy=m["accuracy"],
        test_macro_f1=m["macro_f1"],
        per_class={label: ClassMetrics(**values) for label, values in m["per_class"].items()},
    )
