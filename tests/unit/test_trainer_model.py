"""The trainer's torch part (issue 4, "Model and training"): services/trainer/ model.py, training.py and
export.py.

CPU only. scikit-learn's digits (8x8 upscaled to 32x32, like the demo's PNGs) train the small CNN once per
module; a synthetic 3-class set of 1x16x16 patterns drives the determinism and early-stopping tests.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from contracts.events import ClassMetrics, TrainMetrics
from contracts.kv import Hyperparameters
from services.trainer import export as export_module
from services.trainer.export import (
    CONFIDENCE_BINS,
    export_onnx,
    export_torchscript,
    reference_profile,
    serving_spec,
    sha256_file,
)
from services.trainer.model import build_model
from services.trainer.training import (
    MIN_TRAIN_IMAGES,
    EpochResult,
    TrainResult,
    check_data,
    class_weights,
    evaluate,
    metrics_from_predictions,
    predict,
    train,
)

pytestmark = pytest.mark.unit

DIGIT_LABELS = [str(i) for i in range(10)]
Split = tuple[np.ndarray, np.ndarray]


def digits_splits() -> tuple[Split, Split, Split]:
    """Digits as 1x32x32 float32 in -1..1, split 70/15/15 by a fixed permutation."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images.astype(np.float32) / 16.0).repeat(4, axis=1).repeat(4, axis=2)[:, None]
    images = (images - 0.5) / 0.5
    labels = digits.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(images))
    a, b = int(0.7 * len(order)), int(0.85 * len(order))
    return tuple((images[i], labels[i]) for i in (order[:a], order[a:b], order[b:]))  # type: ignore[return-value]


def patterns(n_per_class: int, seed: int, size: int = 16, noise: float = 0.5) -> Split:
    """3 classes of 1 x size x size: horizontal stripes, vertical stripes, a centred square; plus noise."""
    rng = np.random.default_rng(seed)
    grid = np.indices((size, size))
    square = np.zeros((size, size), np.float32)
    square[size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = 1
    templates = [(grid[0] % 4 < 2).astype(np.float32), (grid[1] % 4 < 2).astype(np.float32), square]
    images, labels = [], []
    for label, template in enumerate(templates):
        for _ in range(n_per_class):
            images.append(template + noise * rng.standard_normal((size, size)).astype(np.float32))
            labels.append(label)
    order = rng.permutation(len(images))
    return np.stack(images)[order][:, None].astype(np.float32), np.array(labels, np.int64)[order]


@pytest.fixture(scope="module")
def digits() -> tuple[Split, Split, Split]:
    return digits_splits()


@pytest.fixture(scope="module")
def trained(digits: tuple[Split, Split, Split]) -> tuple[torch.nn.Module, TrainResult, list[EpochResult]]:
    train_split, val_split, _ = digits
    hp = Hyperparameters(epochs=10, batch_size=64, learning_rate=1e-3, image_size=32, seed=0)
    model = build_model(hp.architecture, 1, 10, hp.image_size, seed=hp.seed)
    epochs: list[EpochResult] = []
    result = train(model, train_split, val_split, hp, device="cpu", on_epoch=epochs.append)
    return model, result, epochs


def test_small_cnn_learns_digits(
    digits: tuple[Split, Split, Split], trained: tuple[torch.nn.Module, TrainResult, list[EpochResult]]
) -> None:
    _, _, (x_test, y_test) = digits
    model, result, epochs = trained
    assert result.device == "cpu" and result.precision == "fp32"
    assert [e.epoch for e in epochs] == list(range(1, result.epochs_run + 1))
    assert result.history == epochs
    assert result.best_val_accuracy > 0.9
    assert result.images_per_s > 0 and all(e.images_per_s > 0 for e in epochs)
    assert set(epochs[0].as_metrics()) >= {"train_loss", "val_loss", "val_accuracy", "images_per_s"}
    assert not model.training

    metrics = evaluate(model, x_test, y_test, DIGIT_LABELS)
    assert metrics["accuracy"] > 0.9
    assert metrics["macro_f1"] > 0.9
    assert sum(c["support"] for c in metrics["per_class"].values()) == len(y_test)
    # The keys map straight onto the event's metrics.
    TrainMetrics(
        val_accuracy=result.best_val_accuracy,
        test_accuracy=metrics["accuracy"],
        test_macro_f1=metrics["macro_f1"],
        per_class={label: ClassMetrics(**values) for label, values in metrics["per_class"].items()},
    )


def test_same_seed_gives_same_metrics_and_weights() -> None:
    train_split, val_split = patterns(40, seed=1), patterns(10, seed=2)
    hp = Hyperparameters(epochs=3, batch_size=16, image_size=16, seed=7, early_stopping_patience=0)

    def run(seed: int) -> tuple[TrainResult, dict[str, torch.Tensor]]:
        model = build_model("small_cnn", 1, 3, 16, seed=seed)
        result = train(model, train_split, val_split, hp.model_copy(update={"seed": seed}), device="cpu")
        return result, model.state_dict()

    first, first_weights = run(7)
    second, second_weights = run(7)
    losses = [(e.train_loss, e.val_loss, e.val_accuracy) for e in first.history]
    assert losses == [(e.train_loss, e.val_loss, e.val_accuracy) for e in second.history]
    assert all(torch.equal(first_weights[k], second_weights[k]) for k in first_weights)
    other, _ = run(8)
    assert [e.train_loss for e in other.history] != [e.train_loss for e in first.history]
    # The global flags are restored after training.
    assert not torch.are_deterministic_algorithms_enabled()


def test_early_stopping_stops_and_restores_the_best_epoch() -> None:
    # Very noisy images, 40% of the training labels drawn at random: the validation loss falls for a few
    # epochs, then rises as the network memorises the training split.
    x_train, y_train = patterns(20, seed=3, noise=1.5)
    x_val, y_val = patterns(20, seed=4, noise=1.5)
    rng = np.random.default_rng(5)
    flipped = rng.random(len(y_train)) < 0.4
    y_train = np.where(flipped, rng.integers(0, 3, len(y_train)), y_train)
    hp = Hyperparameters(
        epochs=40, batch_size=16, learning_rate=3e-3, image_size=16, seed=0, early_stopping_patience=2
    )
    model = build_model("small_cnn", 1, 3, 16, seed=0)
    states: dict[int, dict[str, torch.Tensor]] = {}

    def snapshot(epoch: EpochResult) -> None:
        states[epoch.epoch] = copy.deepcopy(model.state_dict())

    result = train(model, (x_train, y_train), (x_val, y_val), hp, device="cpu", on_epoch=snapshot)
    assert result.stopped_early
    assert result.epochs_run == result.best_epoch + 2 < hp.epochs
    best = result.history[result.best_epoch - 1]
    assert best.best and best.val_loss == min(e.val_loss for e in result.history)
    assert result.best_val_loss == best.val_loss
    restored = model.state_dict()
    assert all(torch.equal(restored[k], states[result.best_epoch][k]) for k in restored)
    assert evaluate(model, x_val, y_val, ["a", "b", "c"])["accuracy"] == pytest.approx(best.val_accuracy)


@pytest.mark.parametrize(
    ("train_split", "val_split", "message"),
    [
        (patterns(10, seed=0)[0], patterns(3, seed=1), "at least 2 labels"),
        (
            (np.zeros((5, 1, 16, 16), np.float32), np.array([0, 1, 0, 1, 0])),
            patterns(3, 1),
            "too few training",
        ),
        (
            patterns(10, seed=0),
            (np.zeros((0, 1, 16, 16), np.float32), np.zeros(0, np.int64)),
            "validation split",
        ),
        (patterns(10, seed=0), patterns(3, seed=1, size=8), "validation images are"),
        ((np.zeros((20, 16, 16), np.float32), np.zeros(20, np.int64)), patterns(3, 1), "N x C x H x W"),
    ],
    ids=["one-class", "too-few-images", "empty-validation", "shape-mismatch", "not-nchw"],
)
def test_unusable_data_is_a_clear_value_error(train_split: Any, val_split: Split, message: str) -> None:
    if isinstance(train_split, np.ndarray):  # one class: every label 0
        train_split = (train_split, np.zeros(len(train_split), np.int64))
    model = build_model("small_cnn", 1, 3, 16)
    with pytest.raises(ValueError, match=message):
        train(model, train_split, val_split, Hyperparameters(epochs=1, image_size=16), device="cpu")


def test_check_data_names_the_problem() -> None:
    x, y = patterns(5, seed=0)
    assert len(x) >= MIN_TRAIN_IMAGES
    with pytest.raises(ValueError, match=r"class indices 0\.\.1"):
        check_data((x, y), (x, y), num_classes=2)
    bad = x.copy()
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        check_data((bad, y), (x, y))
    with pytest.raises(ValueError, match="don't fit the model"):
        train(build_model("small_cnn", 3, 3, 16), (x, y), (x, y), Hyperparameters(epochs=1), device="cpu")


def test_class_weights_balance_an_imbalanced_split() -> None:
    weights = class_weights(np.array([0, 0, 0, 1]), 3)
    assert weights.tolist() == pytest.approx([4 / 6, 2.0, 0.0])
    # Each present class carries the same total weight.
    assert 3 * weights[0] == pytest.approx(1 * weights[1])


def test_torchscript_loaded_back_predicts_like_the_model(
    tmp_path: Path,
    digits: tuple[Split, Split, Split],
    trained: tuple[torch.nn.Module, TrainResult, list[EpochResult]],
) -> None:
    model, _, _ = trained
    _, _, (x_test, _) = digits
    path = export_torchscript(model, x_test[:4], tmp_path / "model.pt")
    loaded = torch.jit.load(str(path))
    assert [a.name for a in loaded.forward.schema.arguments][1:] == ["image"]
    with torch.inference_mode():
        logits, embedding = loaded(torch.from_numpy(x_test))
    expected_logits, expected_embedding = predict(model, x_test, batch_size=64)
    assert np.array_equal(logits.numpy().argmax(1), expected_logits.argmax(1))
    assert np.abs(logits.numpy() - expected_logits).max() < 1e-5
    assert np.abs(embedding.numpy() - expected_embedding).max() < 1e-5
    assert embedding.shape == (len(x_test), 64)
    assert not model.training  # exporting worked on a copy


def test_onnx_export(
    tmp_path: Path,
    digits: tuple[Split, Split, Split],
    trained: tuple[torch.nn.Module, TrainResult, list[EpochResult]],
) -> None:
    onnx = pytest.importorskip("onnx", reason="onnx is not installed: ONNX export is optional")
    model, _, _ = trained
    _, _, (x_test, _) = digits
    path = tmp_path / "model.onnx"
    assert export_onnx(model, x_test[:1], path)
    graph = onnx.load(str(path)).graph
    assert [i.name for i in graph.input] == ["image"]
    assert [o.name for o in graph.output] == ["logits", "embedding"]
    import onnxruntime  # a dev dependency: the export's own check runs it too

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    logits, embedding = session.run(None, {"image": x_test[:7]})
    expected, _ = predict(model, x_test[:7])
    assert np.abs(logits - expected).max() < 1e-4 and embedding.shape == (7, 64)


def test_the_production_triton_configs_bind_to_the_exported_files(
    tmp_path: Path,
    digits: tuple[Split, Split, Split],
    trained: tuple[torch.nn.Module, TrainResult, list[EpochResult]],
) -> None:
    """The libtorch and ONNX Runtime configs serving renders from the spec, held against the files as the
    Triton container's backends read them (no container here to load them): libtorch feeds the TorchScript's
    inputs and takes its outputs by position, ONNX Runtime matches names, types and ranks, and a dynamic
    batch dimension where ``max_batch_size`` > 0."""
    import onnx
    import onnxruntime
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    from services.serving.tritonconfig import TritonOptions, render_config

    model, _, _ = trained
    _, _, (x_test, _) = digits
    export_torchscript(model, x_test[:2], tmp_path / "model.pt")
    assert export_onnx(model, x_test[:2], tmp_path / "model.onnx")
    spec = serving_spec(
        x_test.shape[1:], DIGIT_LABELS, 64, onnx=True, max_batch_size=256, preprocessing={"size": 32}
    )

    def config(backend: Any) -> Any:
        text = render_config("digits", spec, [1], TritonOptions(backend=backend))
        return text_format.Parse(text, model_config_pb2.ModelConfig())

    libtorch = config("pytorch_libtorch")
    module = torch.jit.load(str(tmp_path / "model.pt"))
    assert [i.name for i in libtorch.input] == ["image__0"]
    assert len(module.forward.schema.arguments) == 2  # self and the one tensor libtorch feeds
    outputs = module(torch.from_numpy(x_test[:3]))
    assert isinstance(outputs, tuple) and len(outputs) == len(libtorch.output) == 2
    for declared, tensor in zip(libtorch.output, outputs, strict=True):
        assert tensor.dtype == torch.float32 and tensor.dim() == len(declared.dims) + 1
    assert [tuple(t.shape) for t in outputs] == [(3, 10), (3, 64)]

    ort = config("onnxruntime")
    graph = onnx.load(str(tmp_path / "model.onnx")).graph
    pairs = [*zip(ort.input, graph.input, strict=True), *zip(ort.output, graph.output, strict=True)]
    for declared, actual in pairs:
        assert declared.name == actual.name and declared.data_type == model_config_pb2.TYPE_FP32
        assert actual.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
        dims = actual.type.tensor_type.shape.dim
        assert len(dims) == len(declared.dims) + 1 and not dims[0].HasField("dim_value")  # batch: free
    session = onnxruntime.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    served = session.run([o.name for o in ort.output], {ort.input[0].name: x_test[:5]})
    with torch.inference_mode():
        scripted = module(torch.from_numpy(x_test[:5]))
    for ours, theirs in zip(served, scripted, strict=True):
        assert np.abs(ours - theirs.numpy()).max() < 1e-4


def test_onnx_export_without_onnx_returns_false(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        export_module.importlib.util,
        "find_spec",
        lambda name, *args: None if name.startswith("onnx") else real(name, *args),
    )
    model = build_model("small_cnn", 1, 3, 16)
    assert export_onnx(model, patterns(1, seed=0)[0], tmp_path / "model.onnx") is False
    assert not (tmp_path / "model.onnx").exists()


@pytest.mark.parametrize("image_size", [64, 224])
def test_resnet_builds_runs_and_scripts(tmp_path: Path, image_size: int) -> None:
    model = build_model("resnet", 3, 5, image_size).eval()
    assert sum(p.numel() for p in model.parameters()) > 11_000_000  # ResNet-18 sized
    x = torch.randn(2, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        logits, embedding = model(x)
        scripted_logits, scripted_embedding = torch.jit.script(model)(x)
    assert logits.shape == (2, 5) and embedding.shape == (2, 64)
    assert torch.allclose(logits, scripted_logits, atol=1e-5)
    assert torch.allclose(embedding, scripted_embedding, atol=1e-5)


def test_resnet_trains_an_epoch() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((17, 3, 32, 32)).astype(np.float32)  # 17: a last batch of one is left out
    y = np.arange(17) % 2
    model = build_model("resnet", 3, 2, 32)
    hp = Hyperparameters(architecture="resnet", epochs=1, batch_size=8, image_size=32)
    result = train(model, (x, y), (x[:4], y[:4]), hp, device="cpu")
    assert result.epochs_run == 1 and np.isfinite(result.history[0].train_loss)


def test_predict_is_batched_like_one_batch() -> None:
    x, _ = patterns(10, seed=0)
    model = build_model("small_cnn", 1, 3, 16)
    model.train()
    small = predict(model, x, batch_size=7)
    whole = predict(model, x, batch_size=1000)
    assert model.training  # mode restored
    assert small[0].shape == (30, 3) and small[1].shape == (30, 64)
    assert np.allclose(small[0], whole[0], atol=1e-5) and np.allclose(small[1], whole[1], atol=1e-5)


def test_metrics_match_scikit_learn() -> None:
    from sklearn.metrics import f1_score, precision_recall_fscore_support

    y_true = np.array([0, 0, 1, 1, 1, 2, 2, 0, 1, 2])
    y_pred = np.array([0, 1, 1, 1, 0, 2, 1, 0, 1, 2])
    labels = ["a", "b", "c", "d"]  # "d" occurs in neither: it must not count in macro F1
    metrics = metrics_from_predictions(y_true, y_pred, labels)
    assert metrics["accuracy"] == pytest.approx(0.7)
    assert metrics["macro_f1"] == pytest.approx(f1_score(y_true, y_pred, average="macro"))
    precision, recall, f1, support = precision_recall_fscore_support(y_true, y_pred, labels=[0, 1, 2])
    for i, label in enumerate(labels[:3]):
        values = metrics["per_class"][label]
        assert values["precision"] == pytest.approx(precision[i])
        assert values["recall"] == pytest.approx(recall[i])
        assert values["f1"] == pytest.approx(f1[i])
        assert values["support"] == support[i]
    assert metrics["per_class"]["d"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert metrics["confusion"][0] == [2, 1, 0, 0]


def test_reference_profile_is_json_with_the_documented_keys(
    digits: tuple[Split, Split, Split], trained: tuple[torch.nn.Module, TrainResult, list[EpochResult]]
) -> None:
    model, _, _ = trained
    _, (x_val, _), _ = digits
    logits, embeddings = predict(model, x_val)
    stats = [
        {"mean": float(im.mean()), "std": float(im.std()), "contrast": float(np.ptp(im)), "sharpness": 1.0}
        for im in x_val
    ]
    profile = reference_profile(logits, embeddings, DIGIT_LABELS, stats, sample=100, seed=3)
    text = json.dumps(profile, allow_nan=False)
    assert json.loads(text) == profile
    assert set(profile) >= {
        "version", "labels", "count", "seed", "class_counts", "class_frequencies",
        "confidence", "image_stats", "embeddings",
    }  # fmt: skip
    assert profile["count"] == len(x_val)
    assert sum(profile["class_counts"].values()) == len(x_val)
    assert sum(profile["class_frequencies"].values()) == pytest.approx(1.0, abs=1e-4)
    confidence = profile["confidence"]
    assert confidence["bins"] == CONFIDENCE_BINS and len(confidence["edges"]) == CONFIDENCE_BINS + 1
    assert sum(confidence["counts"]) == len(x_val)
    assert set(profile["image_stats"]) == {"mean", "std", "contrast", "sharpness"}
    assert len(profile["image_stats"]["mean"]["values"]) == len(x_val)
    assert set(profile["image_stats"]["mean"]["quantiles"]) >= {"0.5", "0.99"}
    sampled = profile["embeddings"]
    assert sampled["count"] == 100 and len(sampled["values"]) == 100 and len(sampled["values"][0]) == 64
    assert sampled["dim"] == 64 and len(sampled["mean"]) == 64
    # Seeded: the same inputs give the same profile, another seed another sample.
    assert reference_profile(logits, embeddings, DIGIT_LABELS, stats, sample=100, seed=3) == profile
    other = reference_profile(logits, embeddings, DIGIT_LABELS, None, sample=100, seed=4)
    assert other["embeddings"]["indices"] != sampled["indices"] and other["image_stats"] == {}


def test_sha256_file(tmp_path: Path) -> None:
    path = tmp_path / "blob"
    data = bytes(range(256)) * 10_000
    path.write_bytes(data)
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()
