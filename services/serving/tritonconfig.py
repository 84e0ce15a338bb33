"""Rendering a model's Triton configuration from the trainer's backend-neutral serving spec (pure).

One ``config.pbtxt`` per model covers all its versions, so the tensor dims are left free (-1) where versions
may differ (image size, channels, number of labels); ``version_policy: specific`` lists exactly the versions
the routes need, so Triton loads those and unloads the rest.

Backends:

- ``python`` (the embedded default): the Python backend runs ``model.py`` (``PYTHON_MODEL``) in each version
  folder, which loads the TorchScript on the GPU when the instance is a GPU instance, else on the CPU. Besides
  ``image`` (float32, preprocessed) it takes ``pixels`` (uint8, the samples of 8-bit images already the
  model's size), which it normalises itself: a quarter of the bytes through gRPC and the backend's stub. A
  request carries one of the two (both are optional inputs);
- ``pytorch_libtorch``: Triton's libtorch backend on ``model.pt`` (the production container);
- ``onnxruntime``: ONNX Runtime on ``model.onnx`` (the production container).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

__all__ = [
    "BACKENDS",
    "PIXELS",
    "PYTHON_MODEL",
    "Backend",
    "TritonOptions",
    "model_file",
    "render_config",
    "served_tensors",
]

Backend = Literal["python", "pytorch_libtorch", "onnxruntime"]
BACKENDS: tuple[Backend, ...] = ("python", "pytorch_libtorch", "onnxruntime")

_DTYPES = {
    "float32": "TYPE_FP32",
    "float16": "TYPE_FP16",
    "int64": "TYPE_INT64",
    "int32": "TYPE_INT32",
    "uint8": "TYPE_UINT8",
}


@dataclass(frozen=True)
class TritonOptions:
    backend: Backend = "python"
    gpu: bool = False
    instances: int = 1
    dynamic_batching: bool = True
    max_queue_delay_us: int = 500
    max_batch_size: int = 64
    gpu_precision: Literal["fp32", "fp16"] = "fp32"  # the python backend's GPU instances


def model_file(backend: Backend, spec: Mapping[str, Any]) -> tuple[str, str]:
    """(file in the version folder as the spec names it, the name Triton's backend expects)."""
    files = spec.get("files") or {}
    if backend == "onnxruntime":
        if "onnx" not in files:
            raise ValueError(
                "the model was exported without ONNX; serve it with the python or libtorch backend"
            )
        return files["onnx"], "model.onnx"
    return files.get("torchscript", "model.pt"), "model.pt"


PIXELS = "pixels"
"""The Python backend's uint8 input (N x C x H x W samples of 8-bit images), normalised in ``model.py``."""


def served_tensors(backend: Backend, spec: Mapping[str, Any]) -> dict[str, str]:
    """The spec's tensor names (``image``, ``logits``, ``embedding``) -> the names Triton serves them under
    with ``backend``: the libtorch backend binds TorchScript tensors by position, named ``<name>__<index>``
    (index among the inputs, or among the outputs); the Python backend and ONNX Runtime use the names as
    they are. The Python backend also serves ``pixels``."""
    names = {}
    for tensors in (spec["inputs"], spec["outputs"]):
        for index, entry in enumerate(tensors):
            name = str(entry["name"])
            names[name] = f"{name}__{index}" if backend == "pytorch_libtorch" else name
    if backend == "python":
        names[PIXELS] = PIXELS
    return names


def render_config(
    model: str, spec: Mapping[str, Any], versions: Iterable[int], options: TritonOptions
) -> str:
    """The ``config.pbtxt`` of ``model`` serving ``versions`` with ``options``."""
    listed = sorted(set(versions))
    if not listed:
        raise ValueError("a model config lists at least one version")
    max_batch = min(int(spec.get("max_batch_size") or options.max_batch_size), options.max_batch_size)
    served = served_tensors(options.backend, spec)
    python = options.backend == "python"
    inputs = [_tensor(t, served[t["name"]], optional=python) for t in spec["inputs"]]
    if python:  # a request sends its images as float32 ``image`` or as uint8 ``pixels``
        inputs.append(
            _tensor(
                {"name": PIXELS, "dtype": "uint8", "shape": spec["inputs"][0]["shape"]}, PIXELS, optional=True
            )
        )
    outputs = [_tensor(t, served[t["name"]]) for t in spec["outputs"]]
    kind = "KIND_GPU" if options.gpu else "KIND_CPU"
    lines = [
        f'name: "{model}"',
        f'backend: "{options.backend}"',
        f"max_batch_size: {max_batch}",
        f"input [\n{','.join(inputs)}\n]",
        f"output [\n{','.join(outputs)}\n]",
        f"instance_group [ {{ kind: {kind}, count: {options.instances} }} ]",
        f"version_policy: {{ specific: {{ versions: [{', '.join(map(str, listed))}] }} }}",
    ]
    if options.dynamic_batching:
        lines.append(f"dynamic_batching {{ max_queue_delay_microseconds: {options.max_queue_delay_us} }}")
    if python:
        # each instance runs in its own stub process; keep torch from taking every core in each of them
        lines.append('parameters: { key: "torch_threads" value: { string_value: "0" } }')
        precision = options.gpu_precision
        lines.append(f'parameters: {{ key: "gpu_precision" value: {{ string_value: "{precision}" }} }}')
    return "\n".join(lines) + "\n"


def _tensor(entry: Mapping[str, Any], name: str, *, optional: bool = False) -> str:
    dtype = _DTYPES.get(str(entry.get("dtype")))
    if dtype is None:
        raise ValueError(
            f"tensor {entry.get('name')!r} has dtype {entry.get('dtype')!r}; known: {sorted(_DTYPES)}"
        )
    shape = list(entry["shape"])[1:]  # without the batch dimension
    dims = ", ".join("-1" for _ in shape)  # free: versions of one model may differ
    flag = ", optional: true" if optional else ""
    return f'  {{ name: "{name}", data_type: {dtype}, dims: [ {dims} ]{flag} }}'


PYTHON_MODEL = '''"""Triton Python backend: one version of a Conveyor model, its TorchScript run by torch.

A request sends its images as ``image`` (float32, preprocessed) or as ``pixels`` (uint8 samples of 8-bit
images already the model's size), which are normalised here as ``services/runtime/preprocessing.py``'s
``normalise_pixels`` does: divided by 255, the mean subtracted, divided by the std, in float32, each operand a
tensor on the batch's device (so CUDA divides, rather than multiplying by a reciprocal): the same bits.

On a GPU instance each batch is copied into one pinned host buffer (the copy that joins the requests) and
sent to the GPU from there, padded up to a power of two so cuDNN's autotuning and TorchScript's profiling
see few shapes; pixels are normalised on the GPU. With the ``gpu_precision`` parameter ``fp16`` the module
runs in half precision, channels-last. On a CPU instance the batch runs as it comes, in float32.

Before Triton calls a version ready, ``initialize`` runs zeros through it at the first batch sizes it will
see (``_warm_up``), so TorchScript's profiling and cuDNN's tuning do not land on the first live requests.
"""

import json
import os

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

PIXELS = "pixels"


def _parameter(config, key, default):
    return config.get("parameters", {}).get(key, {}).get("string_value") or default


def _bucket(rows, limit):
    padded = 1
    while padded < rows:
        padded *= 2
    return max(rows, min(padded, limit))


class TritonPythonModel:
    def initialize(self, args):
        here = os.path.join(args["model_repository"], args["model_version"])
        with open(os.path.join(here, "serving_spec.json")) as handle:
            spec = json.load(handle)
        config = json.loads(args["model_config"])
        threads = int(_parameter(config, "torch_threads", "0"))
        if threads > 0:
            torch.set_num_threads(threads)
        self.gpu = args.get("model_instance_kind") == "GPU" and torch.cuda.is_available()
        self.device = torch.device(f"cuda:{args['model_instance_device_id']}" if self.gpu else "cpu")
        path = os.path.join(here, spec.get("files", {}).get("torchscript", "model.pt"))
        self.module = torch.jit.load(path, map_location=self.device).eval()
        self.half = self.gpu and _parameter(config, "gpu_precision", "fp32") == "fp16"
        if self.half:
            self.module = self.module.half().to(memory_format=torch.channels_last)
        if self.gpu:
            torch.backends.cudnn.benchmark = True
        self.max_batch = max(1, int(config.get("max_batch_size") or 1))
        self.staging = {}  # pinned host buffers by dtype
        self.input = spec["inputs"][0]["name"]
        self.outputs = [o["name"] for o in spec["outputs"]]
        pre = spec.get("preprocessing") or {}
        channels = int(spec["inputs"][0].get("shape", [0, 1])[1])
        mean = np.asarray(pre.get("mean", [0.0] * channels), dtype=np.float32).reshape(-1, 1, 1)
        std = np.asarray(pre.get("std", [1.0] * channels), dtype=np.float32).reshape(-1, 1, 1)
        self.unit = [np.float32(255), mean, std]  # pixels -> image: / 255, - mean, / std
        self.unit_on_device = [torch.from_numpy(np.asarray(a)).to(self.device) for a in self.unit]
        self._warm_up([int(d) for d in spec["inputs"][0]["shape"][1:]])

    def _warm_up(self, shape):
        """Run zeros through the module twice at each batch size the first live requests will bring, before
        Triton calls the version ready: TorchScript profiles and optimises its graph on the first calls of
        a shape, and cuDNN tunes its kernels (measured on a CPU: 100 ms for the very first call of a small
        CNN, 10-25 ms for the next few), which would otherwise land on those requests (a canary would be
        judged on them). On a GPU every padded size up to the max batch; on a CPU, which runs batches as they
        come, the sizes up to 4."""
        if any(d <= 0 for d in shape):
            return  # free dims: no shape to warm
        if self.gpu:
            sizes = sorted({_bucket(n, self.max_batch) for n in range(1, self.max_batch + 1)})
        else:
            sizes = range(1, min(4, self.max_batch) + 1)
        for rows in sizes:
            for _ in range(2):
                self._forward([np.zeros((rows, *shape), dtype=np.float32)], [False])

    def _on_device(self, batch, rows):
        if not self.gpu:
            return torch.from_numpy(batch[0] if len(batch) == 1 else np.concatenate(batch))
        padded = _bucket(rows, self.max_batch)
        tail = batch[0].shape[1:]
        dtype = torch.from_numpy(batch[0][:0]).dtype
        staging = self.staging.get(dtype)
        if staging is None or staging.shape[1:] != tail or len(staging) < padded:
            staging = torch.empty((padded, *tail), dtype=dtype)  # grows with the batches, a few times
            try:
                staging = staging.pin_memory()
            except RuntimeError:  # no pinned memory to be had: pageable, slower to copy
                pass
            self.staging[dtype] = staging
        # rows past ``rows`` hold stale data: each row's outputs depend on that row alone (eval mode) and
        # are sliced off; the buffer is free again once this batch's outputs are back on the host
        np.concatenate(batch, out=staging.numpy()[:rows])
        return staging[:padded].to(self.device, non_blocking=True)

    @staticmethod
    def _normalised(x, unit):
        """float32 pixels (an array, or a tensor on the batch's device) / 255, - mean, / std, in place."""
        scale, mean, std = unit
        x /= scale
        x -= mean
        x /= std
        return x

    def execute(self, requests):
        # each request holds image or pixels (Triton refuses a request without inputs); image when both
        batch, pixels = [], []
        for request in requests:
            tensor = pb_utils.get_input_tensor_by_name(request, self.input)
            sent = tensor is None
            if sent:
                tensor = pb_utils.get_input_tensor_by_name(request, PIXELS)
            batch.append(tensor.as_numpy())
            pixels.append(sent)
        arrays = self._forward(batch, pixels)
        responses, start = [], 0
        for size in (b.shape[0] for b in batch):
            tensors = [pb_utils.Tensor(n, a[start : start + size]) for n, a in zip(self.outputs, arrays)]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
            start += size
        return responses

    def _forward(self, batch, pixels):
        """The module's outputs (numpy, float32) for the rows of ``batch``'s arrays, in order; ``pixels``
        says which arrays are uint8 pixels rather than images."""
        if any(pixels) and not all(pixels):  # both kinds in one batch: the pixels become images here
            unit = self.unit
            batch = [self._normalised(a.astype(np.float32), unit) if p else a for a, p in zip(batch, pixels)]
        rows = sum(b.shape[0] for b in batch)
        with torch.inference_mode():
            x = self._on_device(batch, rows)
            if all(pixels):
                x = self._normalised(x.to(torch.float32), self.unit_on_device)
            if self.half:
                x = x.half().contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x.half()
            results = self.module(x)
        if isinstance(results, torch.Tensor):
            results = (results,)
        return [r[:rows].float().cpu().numpy() for r in results]
'''
"""The ``model.py`` of the Python backend, written into each version folder."""
