"""The Python backend's ``model.py`` (``PYTHON_MODEL``) run outside Triton: ``triton_python_backend_utils``
is replaced by a small stand-in of its tensor, request and response types (only Triton has the real one),
the TorchScript is real. The integration tests load the same file into the real tritonserver on the CPU;
the GPU path's pinned buffer and power-of-two padding are run here on the CPU (``pin_memory`` is the one
thing swapped, since this torch has no CUDA), fp16 only on a GPU (``bench/gpu.py serve``)."""

from __future__ import annotations

import json
import sys
import types

import numpy as np
import pytest
import torch

from services.runtime.preprocessing import PreprocessSpec, normalise_pixels
from services.serving.tritonconfig import PYTHON_MODEL
from services.trainer.export import export_torchscript
from services.trainer.model import build_model

pytestmark = pytest.mark.unit

PRE = PreprocessSpec(size=16, channels=1, mean=(0.4377,), std=(0.1982,))


class Tensor:
    def __init__(self, name, array):
        self.name, self.array = name, array

    def as_numpy(self):
        return self.array


class InferenceResponse:
    def __init__(self, output_tensors):
        self.outputs = {t.name: t.array for t in output_tensors}


@pytest.fixture
def model_py(monkeypatch, tmp_path):
    utils = types.SimpleNamespace(
        Tensor=Tensor,
        InferenceResponse=InferenceResponse,
        get_input_tensor_by_name=lambda request, name: request.get(name),  # None when not sent, as Triton's
    )
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", utils)
    namespace: dict = {}
    exec(compile(PYTHON_MODEL, "model.py", "exec"), namespace)  # the file Triton would run
    folder = tmp_path / "1"
    folder.mkdir()
    network = build_model("small_cnn", 1, 10, 16, seed=0).eval()
    export_torchscript(network, np.zeros((2, 1, 16, 16), np.float32), folder / "model.pt")
    spec = {
        "files": {"torchscript": "model.pt"},
        "inputs": [{"name": "image", "dtype": "float32", "shape": [-1, 1, 16, 16]}],
        "outputs": [{"name": "logits"}, {"name": "embedding"}],
        "preprocessing": PRE.to_dict(),
    }
    (folder / "serving_spec.json").write_text(json.dumps(spec))

    def instance(kind="CPU", max_batch=8):
        model = namespace["TritonPythonModel"]()
        model.initialize(
            {
                "model_repository": str(tmp_path),
                "model_version": "1",
                "model_config": json.dumps({"max_batch_size": max_batch, "parameters": {}}),
                "model_instance_kind": kind,
                "model_instance_device_id": "0",
            }
        )
        return model

    return namespace, network, instance


def requests(sizes, seed=0):
    rng = np.random.default_rng(seed)
    return [{"image": Tensor("image", rng.standard_normal((n, 1, 16, 16), dtype=np.float32))} for n in sizes]


def expected(network, request):
    with torch.no_grad():
        logits, embedding = network(torch.from_numpy(request["image"].as_numpy()))
    return logits.numpy(), embedding.numpy()


def test_each_request_gets_its_own_rows_of_the_batch(model_py):
    _, network, instance = model_py
    model = instance()
    batch = requests([1, 2, 3])
    for request, response in zip(batch, model.execute(batch), strict=True):
        logits, embedding = expected(network, request)
        assert np.allclose(response.outputs["logits"], logits, atol=1e-5)
        assert response.outputs["embedding"].shape == embedding.shape


@pytest.mark.parametrize("gpu_path", [False, True])
def test_a_version_warms_up_before_triton_calls_it_ready(model_py, monkeypatch, gpu_path):
    """The first calls of each shape are TorchScript's slow profiling runs: ``initialize`` makes them, on
    zeros, at the batch sizes the first requests bring (on the GPU path, every padded size)."""
    _, network, instance = model_py
    seen = []
    load = torch.jit.load

    class Recorded:
        def __init__(self, module):
            self.module = module

        def eval(self):
            return self

        def __call__(self, x):
            seen.append((tuple(x.shape), bool(x.any())))
            return self.module(x)

    def recorded(path, map_location):
        return Recorded(load(path, map_location="cpu"))

    monkeypatch.setattr(torch.jit, "load", recorded)
    if gpu_path:  # the GPU path on the CPU: a GPU instance whose pinning is swapped out
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: self)
        monkeypatch.setattr(torch.Tensor, "to", lambda self, *args, **kwargs: self)
    model = instance(kind="GPU" if gpu_path else "CPU", max_batch=8)
    sizes = [1, 2, 4, 8] if gpu_path else [1, 2, 3, 4]
    assert seen == [((n, 1, 16, 16), False) for n in sizes for _ in range(2)]
    batch = requests([3])  # and it answers as before
    assert np.allclose(model.execute(batch)[0].outputs["logits"], expected(network, batch[0])[0], atol=1e-5)


def test_batches_pad_to_a_power_of_two_in_a_reused_buffer(model_py, monkeypatch):
    namespace, network, instance = model_py
    bucket = namespace["_bucket"]
    assert [bucket(n, 64) for n in (1, 2, 3, 5, 33, 64)] == [1, 2, 4, 8, 64, 64]
    assert (bucket(33, 48), bucket(9, 8)) == (48, 9)  # capped at the max batch, never below the rows
    model = instance(max_batch=8)
    model.gpu = True  # the GPU path, on the CPU: only the pinning is swapped out
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: self)
    seen, buffers = [], []
    module = model.module
    model.module = lambda x: seen.append(tuple(x.shape)) or module(x)
    # 1 row; 5 rows -> 8 (the buffer grows); 3 -> 4 over the last batch's stale rows; 8
    for n, sizes in enumerate(([1], [1, 2, 2], [3], [8])):
        batch = requests(sizes, seed=n)
        for request, response in zip(batch, model.execute(batch), strict=True):
            assert np.allclose(response.outputs["logits"], expected(network, request)[0], atol=1e-5)
        buffers.append(model.staging[torch.float32])
    assert [s[0] for s in seen] == [1, 8, 4, 8]
    assert [len(b) for b in buffers] == [1, 8, 8, 8] and buffers[1] is buffers[2] is buffers[3]


def pixel_requests(sizes, seed=0):
    rng = np.random.default_rng(seed)
    return [{"pixels": Tensor("pixels", rng.integers(0, 256, (n, 1, 16, 16), dtype=np.uint8))} for n in sizes]


def as_images(request):
    """The same request as the gateway's float path sends it (``normalise_pixels``: preprocessing's rules)."""
    return {"image": Tensor("image", normalise_pixels(request["pixels"].as_numpy(), PRE))}


@pytest.mark.parametrize("gpu_path", [False, True])
def test_pixels_give_the_outputs_of_their_normalised_images_to_the_bit(model_py, monkeypatch, gpu_path):
    _, _, instance = model_py
    model = instance(max_batch=8)
    if gpu_path:  # the pinned uint8 buffer and the normalisation after the copy, on the CPU
        model.gpu = True
        monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: self)
    for seed, sizes in enumerate(([1], [2, 3], [1, 1, 1])):
        sent = pixel_requests(sizes, seed=seed)
        ours = model.execute(sent)
        theirs = model.execute([as_images(r) for r in sent])
        for a, b in zip(ours, theirs, strict=True):
            assert a.outputs["logits"].shape[1] == 10
            assert a.outputs["logits"].tobytes() == b.outputs["logits"].tobytes()
            assert a.outputs["embedding"].tobytes() == b.outputs["embedding"].tobytes()
    if gpu_path:
        assert set(model.staging) == {torch.uint8, torch.float32}  # one buffer per kind, kept


def test_a_batch_of_both_kinds(model_py):
    _, network, instance = model_py
    model = instance()
    sent = [*pixel_requests([2], seed=1), *requests([3], seed=2)]
    pixels_response, image_response = model.execute(sent)
    same = model.execute([as_images(sent[0]), sent[1]])[0]  # the same batch, all as images
    assert pixels_response.outputs["logits"].tobytes() == same.outputs["logits"].tobytes()
    assert np.allclose(image_response.outputs["logits"], expected(network, sent[1])[0], atol=1e-5)
