"""The registry's model evaluation (issue 5, "Gates"): services/registry/evaluation.py on a tiny real model.

CPU only: a small CNN (1 channel, 3 classes, 16x16) exported as the trainer exports it, with a serving spec
written like ``services.trainer.pipeline``'s.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from contracts.events import ArtifactRef
from services.registry.evaluation import (
    ArtifactMismatch,
    LoadedModel,
    ModelLoadError,
    download_model_dir,
    evaluate_on,
    latency_p50_ms,
    smoke,
    smoke_load,
)
from services.runtime.preprocessing import PreprocessSpec, fit_spec, preprocess_batch
from services.trainer.export import export_torchscript
from services.trainer.model import build_model
from services.trainer.training import evaluate
from tests.images import gray_png

pytestmark = pytest.mark.unit

LABELS = ["circle", "cross", "square"]
SIZE, CHANNELS, EMBEDDING = 16, 1, 64


def serving_spec(spec: PreprocessSpec, labels: list[str], embedding: int = EMBEDDING) -> dict[str, Any]:
    """What the trainer writes next to model.pt (pipeline.py ``_export``)."""
    return {
        "format": "torchscript",
        "files": {"torchscript": "model.pt"},
        "inputs": [{"name": "image", "dtype": "float32", "shape": [-1, spec.channels, spec.size, spec.size]}],
        "outputs": [
            {"name": "logits", "dtype": "float32", "shape": [-1, len(labels)]},
            {"name": "embedding", "dtype": "float32", "shape": [-1, embedding]},
        ],
        "max_batch_size": 256,
        "preprocessing": spec.to_dict(),
        "labels": labels,
    }


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[Path, str]]:
    root = tmp_path_factory.mktemp("images")
    files = []
    for i in range(12):
        label = LABELS[i % len(LABELS)]
        path = root / label / f"{i}.png"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(gray_png(20 + i, 18, seed=i))  # sizes differ: preprocessing resizes to 16x16
        files.append((path, label))
    return files


@pytest.fixture(scope="module")
def exported(
    tmp_path_factory: pytest.TempPathFactory, images: list[tuple[Path, str]]
) -> tuple[Path, nn.Module, PreprocessSpec]:
    """(model folder, the in-memory model, its preprocessing), exported once for the module."""
    out = tmp_path_factory.mktemp("model")
    spec = fit_spec([path for path, _ in images], size=SIZE, channels=CHANNELS)
    model = build_model("small_cnn", CHANNELS, len(LABELS), SIZE).eval()
    export_torchscript(model, preprocess_batch([images[0][0], images[1][0]], spec), out / "model.pt")
    (out / "serving_spec.json").write_text(json.dumps(serving_spec(spec, LABELS), indent=2))
    return out, model, spec


@pytest.fixture
def model_dir(exported: tuple[Path, nn.Module, PreprocessSpec], tmp_path: Path) -> Path:
    """A copy of the exported folder that a test may damage."""
    return Path(shutil.copytree(exported[0], tmp_path / "model"))


def edit_spec(model_dir: Path, change: Callable[[dict[str, Any]], None]) -> None:
    path = model_dir / "serving_spec.json"
    spec = json.loads(path.read_text())
    change(spec)
    path.write_text(json.dumps(spec))


# ---- load and smoke ---------------------------------------------------------------------------------------


def test_load_reads_the_spec_and_the_torchscript(exported: tuple[Path, nn.Module, PreprocessSpec]) -> None:
    folder, _, spec = exported
    model = LoadedModel.load(folder)
    assert model.labels == tuple(LABELS)
    assert model.preprocessing == spec
    assert model.input.name == "image" and model.input.shape == (-1, CHANNELS, SIZE, SIZE)
    assert [o.name for o in model.outputs] == ["logits", "embedding"]
    assert model.max_batch_size == 256
    assert not model.module.training


def test_smoke_passes_for_the_exported_model(exported: tuple[Path, nn.Module, PreprocessSpec]) -> None:
    result = smoke(LoadedModel.load(exported[0]))
    assert result.ok, result.detail
    assert result.detail == "loaded; a batch of 2 gave logits 2x3 and embedding 2x64, all finite"
    loaded, again = smoke_load(exported[0])
    assert loaded is not None and again == result


def test_latency_is_a_positive_median(exported: tuple[Path, nn.Module, PreprocessSpec]) -> None:
    model = LoadedModel.load(exported[0])
    p50 = latency_p50_ms(model, runs=5, warmup=1)
    assert 0 < p50 < 10_000
    with pytest.raises(ValueError, match="runs must be at least 1"):
        latency_p50_ms(model, runs=0)


def test_a_corrupt_model_file_fails_the_smoke_load(model_dir: Path) -> None:
    data = bytearray((model_dir / "model.pt").read_bytes())
    (model_dir / "model.pt").write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(ModelLoadError, match="cannot be loaded as TorchScript"):
        LoadedModel.load(model_dir)
    model, result = smoke_load(model_dir)
    assert model is None and not result.ok
    assert result.detail.startswith("the model did not load: model.pt cannot be loaded as TorchScript (")
    assert "corrupt or not a TorchScript archive" in result.detail


def test_a_missing_model_file_fails_the_smoke_load(model_dir: Path) -> None:
    (model_dir / "model.pt").unlink()
    model, result = smoke_load(model_dir)
    assert model is None and not result.ok
    assert "model.pt is missing" in result.detail


def test_a_spec_whose_output_shape_differs_from_the_model_fails_the_smoke(model_dir: Path) -> None:
    edit_spec(model_dir, lambda s: s["outputs"][1].update(shape=[-1, 32]))
    model, result = smoke_load(model_dir)
    assert model is not None and not result.ok
    assert result.detail == "output 'embedding' has shape 2x64, the serving spec declares [-1, 32] (batch 2)"


def test_more_labels_than_the_model_has_outputs_fails_the_smoke(model_dir: Path) -> None:
    def four_labels(spec: dict[str, Any]) -> None:
        spec["labels"] = [*LABELS, "star"]
        spec["outputs"][0]["shape"] = [-1, 4]

    edit_spec(model_dir, four_labels)
    _, result = smoke_load(model_dir)
    assert not result.ok
    assert "output 'logits' has shape 2x3, the serving spec declares [-1, 4]" in result.detail
    assert "logits have shape 2x3; 2 x 4 expected for the 4 labels of the serving spec" in result.detail


def test_a_model_that_takes_other_inputs_fails_the_smoke(model_dir: Path) -> None:
    def three_channels(spec: dict[str, Any]) -> None:
        spec["preprocessing"] = PreprocessSpec.identity(SIZE, 3).to_dict()
        spec["inputs"][0]["shape"] = [-1, 3, SIZE, SIZE]

    edit_spec(model_dir, three_channels)
    _, result = smoke_load(model_dir)
    assert not result.ok
    assert result.detail.startswith("inference on a random batch of 2 2x3x16x16 failed: RuntimeError:")


def test_an_input_named_otherwise_fails_the_smoke(model_dir: Path) -> None:
    edit_spec(model_dir, lambda s: s["inputs"][0].update(name="x"))
    _, result = smoke_load(model_dir)
    assert not result.ok
    assert result.detail == "the model's input is named 'image', the serving spec says 'x'"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda s: s.update(format="onnx"), "format is 'onnx'"),
        (lambda s: s["inputs"][0].update(shape=[-1, 1, 32, 32]), r"preprocessing makes \[-1, 1, 16, 16\]"),
        (lambda s: s.update(outputs=[s["outputs"][1]]), "outputs must name 'logits'"),
        (lambda s: s.update(labels=[]), "labels must be a non-empty list"),
        (lambda s: s["preprocessing"].update(format=99), "format 99"),
        (lambda s: s.pop("preprocessing"), "preprocessing"),
    ],
)
def test_an_invalid_spec_is_a_load_error(
    model_dir: Path, change: Callable[[dict[str, Any]], None], message: str
) -> None:
    edit_spec(model_dir, change)
    with pytest.raises(ModelLoadError, match=message):
        LoadedModel.load(model_dir)


def test_a_folder_without_a_spec_is_a_load_error(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"serving_spec\.json is missing"):
        LoadedModel.load(tmp_path)
    (tmp_path / "serving_spec.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="cannot be read as JSON"):
        LoadedModel.load(tmp_path)


# ---- evaluation -------------------------------------------------------------------------------------------


def test_evaluate_on_matches_the_trainers_computation(
    exported: tuple[Path, nn.Module, PreprocessSpec], images: list[tuple[Path, str]]
) -> None:
    folder, module, spec = exported
    metrics = evaluate_on(LoadedModel.load(folder), images, batch_size=5)  # 3 batches, the last one short
    x = preprocess_batch([path for path, _ in images], spec)
    y = np.array([LABELS.index(label) for _, label in images])
    direct = evaluate(module, x, y, LABELS)
    assert metrics.test_accuracy == pytest.approx(direct["accuracy"])
    assert metrics.val_accuracy == metrics.test_accuracy
    assert metrics.test_macro_f1 == pytest.approx(direct["macro_f1"])
    assert set(metrics.per_class) == set(LABELS)
    for label in LABELS:
        assert metrics.per_class[label].model_dump() == pytest.approx(direct["per_class"][label])
        assert metrics.per_class[label].support == 4
    for value in (metrics.test_accuracy, metrics.test_macro_f1):
        assert 0 <= value <= 1


def test_evaluate_on_counts_the_argmax_of_the_logits(
    exported: tuple[Path, nn.Module, PreprocessSpec], images: list[tuple[Path, str]]
) -> None:
    folder, module, spec = exported
    x = torch.from_numpy(preprocess_batch([path for path, _ in images], spec))
    with torch.inference_mode():
        predicted = module(x)[0].argmax(dim=1).tolist()
    # Label every image with what the model predicts: accuracy 1; with another label: accuracy 0.
    right = [(path, LABELS[p]) for (path, _), p in zip(images, predicted, strict=True)]
    wrong = [(path, LABELS[(p + 1) % 3]) for (path, _), p in zip(images, predicted, strict=True)]
    model = LoadedModel.load(folder)
    assert evaluate_on(model, right).test_accuracy == 1.0
    assert evaluate_on(model, wrong).test_accuracy == 0.0
    assert evaluate_on(model, wrong).test_macro_f1 == 0.0


def test_evaluate_on_takes_bytes_too(
    exported: tuple[Path, nn.Module, PreprocessSpec], images: list[tuple[Path, str]]
) -> None:
    model = LoadedModel.load(exported[0])
    as_bytes = [(path.read_bytes(), label) for path, label in images]
    assert evaluate_on(model, as_bytes) == evaluate_on(model, images)


def test_a_label_the_model_does_not_know_counts_as_wrong(
    exported: tuple[Path, nn.Module, PreprocessSpec], images: list[tuple[Path, str]]
) -> None:
    model = LoadedModel.load(exported[0])
    known = evaluate_on(model, images)
    extra = [(path, "star") for path, _ in images[:4]]
    metrics = evaluate_on(model, [*images, *extra])
    correct = round(known.test_accuracy * len(images))
    assert metrics.test_accuracy == pytest.approx(correct / (len(images) + len(extra)))
    star = metrics.per_class["star"]
    assert (star.recall, star.f1, star.support) == (0.0, 0.0, 4)
    assert list(metrics.per_class) == [*LABELS, "star"]


def test_evaluate_on_nothing_is_an_error(exported: tuple[Path, nn.Module, PreprocessSpec]) -> None:
    with pytest.raises(ValueError, match="no images"):
        evaluate_on(LoadedModel.load(exported[0]), [])


# ---- download ---------------------------------------------------------------------------------------------


class FakeMlflow:
    """``MlflowClient.download_artifacts`` over a local folder of runs: ``<root>/<run_id>/<path>``."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def download_artifacts(self, run_id: str, path: str, dst_path: str | None = None) -> str:
        assert dst_path is not None
        target = Path(dst_path) / path
        shutil.copytree(self.root / run_id / path, target, dirs_exist_ok=True)
        return str(target)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def artifacts(exported: tuple[Path, nn.Module, PreprocessSpec], tmp_path: Path) -> tuple[FakeMlflow, dict]:
    run = tmp_path / "runs" / "run1" / "model"
    shutil.copytree(exported[0], run)
    shas = {p.name: sha256(p) for p in sorted(run.iterdir())}
    (run / "sha256.json").write_text(json.dumps(shas))
    return FakeMlflow(tmp_path / "runs"), shas


def test_download_verifies_the_published_hashes(artifacts: tuple[FakeMlflow, dict], tmp_path: Path) -> None:
    client, shas = artifacts
    local = download_model_dir(client, "run1", tmp_path / "dl", shas)
    assert local == tmp_path / "dl" / "model"
    assert smoke(LoadedModel.load(local)).ok
    refs = {name: ArtifactRef(uri=f"mlflow-artifacts:/x/{name}", sha256=sha) for name, sha in shas.items()}
    assert download_model_dir(client, "run1", tmp_path / "dl", refs) == local  # again, over the first


def test_download_refuses_a_changed_file(artifacts: tuple[FakeMlflow, dict], tmp_path: Path) -> None:
    client, shas = artifacts
    model_pt = client.root / "run1" / "model" / "model.pt"
    model_pt.write_bytes(model_pt.read_bytes() + b"\0")
    with pytest.raises(ArtifactMismatch) as caught:
        download_model_dir(client, "run1", tmp_path / "dl", shas)
    message = str(caught.value)
    assert (
        "run run1" in message
        and f"model.pt: sha256 {sha256(model_pt)}, expected {shas['model.pt']}" in message
    )
    assert not (tmp_path / "dl" / "model").exists(), "nothing unverified is left behind"


def test_download_refuses_a_missing_file(artifacts: tuple[FakeMlflow, dict], tmp_path: Path) -> None:
    client, shas = artifacts
    (client.root / "run1" / "model" / "serving_spec.json").unlink()
    with pytest.raises(ArtifactMismatch, match=r"serving_spec\.json: missing"):
        download_model_dir(client, "run1", tmp_path / "dl", shas)


def test_download_needs_hashes_to_verify(artifacts: tuple[FakeMlflow, dict], tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no sha256"):
        download_model_dir(artifacts[0], "run1", tmp_path / "dl", {})
    with pytest.raises(ValueError, match="not a path inside"):
        download_model_dir(artifacts[0], "run1", tmp_path / "dl", {"../x": "0" * 64})
