"""The Triton configs serving renders, read back by Triton's own protobuf schema (``ModelConfig`` from
tritonclient's ``model_config_pb2``): an unknown field, a bad enum or a malformed block fails to parse, as
it would fail tritonserver's loading. The libtorch and ONNX Runtime configs are for the production
container; only the Python backend's is loaded here (tests/integration/test_serving.py)."""

from __future__ import annotations

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from services.serving.tritonconfig import BACKENDS, TritonOptions, model_file, render_config, served_tensors

pytestmark = pytest.mark.unit

SPEC = {
    "format": "torchscript",
    "files": {"torchscript": "model.pt", "onnx": "model.onnx"},
    "inputs": [{"name": "image", "dtype": "float32", "shape": [-1, 1, 32, 32]}],
    "outputs": [
        {"name": "logits", "dtype": "float32", "shape": [-1, 10]},
        {"name": "embedding", "dtype": "float32", "shape": [-1, 64]},
    ],
    "max_batch_size": 256,
    "labels": [str(i) for i in range(10)],
}


def parsed(text: str) -> model_config_pb2.ModelConfig:
    return text_format.Parse(text, model_config_pb2.ModelConfig())


@pytest.mark.parametrize("backend", BACKENDS)
def test_each_backend_renders_a_config_tritons_schema_reads(backend):
    options = TritonOptions(backend=backend, gpu=True, instances=2, max_queue_delay_us=300, max_batch_size=64)
    config = parsed(render_config("digits", SPEC, [3, 1], options))
    names = served_tensors(backend, SPEC)
    assert (config.name, config.backend, config.max_batch_size) == ("digits", backend, 64)
    python = backend == "python"
    assert [i.name for i in config.input] == [names["image"], *(["pixels"] if python else [])]
    assert [o.name for o in config.output] == [names["logits"], names["embedding"]]
    assert all(t.data_type == model_config_pb2.TYPE_FP32 for t in [config.input[0], *config.output])
    assert list(config.input[0].dims) == [-1, -1, -1] and list(config.output[1].dims) == [-1]
    # the Python backend takes images as float32 or as uint8 pixels: each request sends one of the two
    assert [i.optional for i in config.input] == ([True, True] if python else [False])
    if python:
        assert config.input[1].data_type == model_config_pb2.TYPE_UINT8
        assert list(config.input[1].dims) == [-1, -1, -1]
    [group] = config.instance_group
    assert (group.kind, group.count) == (model_config_pb2.ModelInstanceGroup.KIND_GPU, 2)
    assert list(config.version_policy.specific.versions) == [1, 3]
    assert config.dynamic_batching.max_queue_delay_microseconds == 300
    assert ("torch_threads" in config.parameters) == (backend == "python")
    if backend == "python":
        assert config.parameters["gpu_precision"].string_value == "fp32"
        half = parsed(render_config("digits", SPEC, [1], TritonOptions(gpu=True, gpu_precision="fp16")))
        assert half.parameters["gpu_precision"].string_value == "fp16"


def test_libtorch_names_tensors_by_position_and_the_others_by_name():
    assert served_tensors("pytorch_libtorch", SPEC) == {
        "image": "image__0",
        "logits": "logits__0",
        "embedding": "embedding__1",
    }
    same = {"image": "image", "logits": "logits", "embedding": "embedding"}
    assert served_tensors("onnxruntime", SPEC) == same
    assert served_tensors("python", SPEC) == {**same, "pixels": "pixels"}


def test_without_dynamic_batching_or_on_the_cpu():
    config = parsed(render_config("digits", SPEC, [1], TritonOptions(dynamic_batching=False)))
    assert not config.HasField("dynamic_batching")
    assert config.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_CPU


def test_the_files_each_backend_reads():
    assert model_file("onnxruntime", SPEC) == ("model.onnx", "model.onnx")
    assert model_file("pytorch_libtorch", SPEC) == ("model.pt", "model.pt")
    with pytest.raises(ValueError, match="exported without ONNX"):
        model_file("onnxruntime", {**SPEC, "files": {"torchscript": "model.pt"}})


def test_bad_specs_are_refused_with_the_reason():
    with pytest.raises(ValueError, match="at least one version"):
        render_config("digits", SPEC, [], TritonOptions())
    bad = {**SPEC, "outputs": [{"name": "logits", "dtype": "bfloat17", "shape": [-1, 10]}]}
    with pytest.raises(ValueError, match="dtype 'bfloat17'"):
        render_config("digits", bad, [1], TritonOptions())


def test_the_repository_records_the_served_names_of_each_version(tmp_path):
    import json

    from services.serving.repository import ModelRepository, served_names

    files = tmp_path / "files"
    files.mkdir()
    (files / "serving_spec.json").write_text(json.dumps(SPEC))
    (files / "model.pt").write_bytes(b"torchscript")
    repo = ModelRepository(tmp_path / "models", TritonOptions(backend="pytorch_libtorch"))
    folder = repo.install("digits", 4, files, {"model.pt": "ab", "serving_spec.json": "cd"})
    assert repo.served("digits", 4) == served_tensors("pytorch_libtorch", SPEC)
    assert repo.on_disk("digits") == [4] and not (folder / "model.py").exists()
    assert repo.write_config("digits", [4]) == [4]
    assert 'name: "logits__0"' in (folder.parent / "config.pbtxt").read_text()
    (folder / "served.json").unlink()  # written before served.json existed: the Python backend's names
    assert served_names(folder) == {"image": "image", "logits": "logits", "embedding": "embedding"}
