"""Rendering a model's Triton configuration from the trainer's backend-neutral serving spec (pure).

One ``config.pbtxt`` per model covers all its versions, so the tensor dims are left free (-1) where versions
may differ (image size, channels, number of labels); ``version_policy: specific`` lists exactly the versions
the routes need, so Triton loads those and unloads the rest.

Backends:

- ``python`` (the embedded default): the Python backend runs ``model.py`` (``PYTHON_MODEL``) in each version
  folder, which loads the TorchScript on the GPU when the instance is a GPU instance, else on the CPU;
- ``pytorch_libtorch``: Triton's libtorch backend on ``model.pt`` (the production container);
- ``onnxruntime``: ONNX Runtime on ``model.onnx`` (the production container).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

__all__ = [
    "BACKENDS",
    "PYTHON_MODEL",
    "Backend",
    "TritonOptions",
    "model_file",
    "render_config",
    "served_tensors",
]

Backend = Literal["python", "pytorch_libtorch", "onnxruntime"]
BACKENDS: tuple[Backend, ...] = ("python", "pytorch_libtorch", "onnxruntime")

_DTYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "int64": "TYPE_INT64", "int32": "TYPE_INT32"}


@dataclass(frozen=True)
class TritonOptions:
    backend: Backend = "python"
    gpu: bool = False
    instances: int = 1
    dynamic_batching: bool = True
    max_queue_delay_us: int = 500
    max_batch_size: int = 64


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


def served_tensors(backend: Backend, spec: Mapping[str, Any]) -> dict[str, str]:
    """The spec's tensor names (``image``, ``logits``, ``embedding``) -> the names Triton serves them under
    with ``backend``: the libtorch backend binds TorchScript tensors by position, named ``<name>__<index>``
    (index among the inputs, or among the outputs); the Python backend and ONNX Runtime use the names as
    they are."""
    names = {}
    for tensors in (spec["inputs"], spec["outputs"]):
        for index, entry in enumerate(tensors):
            name = str(entry["name"])
            names[name] = f"{name}__{index}" if backend == "pytorch_libtorch" else name
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
    inputs = [_tensor(t, served[t["name"]]) for t in spec["inputs"]]
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
    if options.backend == "python":
        # each instance runs in its own stub process; keep torch from taking every core in each of them
        lines.append('parameters: { key: "torch_threads" value: { string_value: "0" } }')
    return "\n".join(lines) + "\n"


def _tensor(entry: Mapping[str, Any], name: str) -> str:
    dtype = _DTYPES.get(str(entry.get("dtype")))
    if dtype is None:
        raise ValueError(
            f"tensor {entry.get('name')!r} has dtype {entry.get('dtype')!r}; known: {sorted(_DTYPES)}"
        )
    shape = list(entry["shape"])[1:]  # without the batch dimension
    dims = ", ".join("-1" for _ in shape)  # free: versions of one model may differ
    return f'  {{ name: "{name}", data_type: {dtype}, dims: [ {dims} ] }}'


PYTHON_MODEL = '''"""Triton Python backend: one version of a Conveyor model, its TorchScript run by torch."""

import json
import os

import torch
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        here = os.path.join(args["model_repository"], args["model_version"])
        with open(os.path.join(here, "serving_spec.json")) as handle:
            spec = json.load(handle)
        params = json.loads(args["model_config"]).get("parameters", {})
        threads = int(params.get("torch_threads", {}).get("string_value", "0") or 0)
        if threads > 0:
            torch.set_num_threads(threads)
        gpu = args.get("model_instance_kind") == "GPU" and torch.cuda.is_available()
        self.device = torch.device(f"cuda:{args['model_instance_device_id']}" if gpu else "cpu")
        path = os.path.join(here, spec.get("files", {}).get("torchscript", "model.pt"))
        self.module = torch.jit.load(path, map_location=self.device).eval()
        self.input = spec["inputs"][0]["name"]
        self.outputs = [o["name"] for o in spec["outputs"]]

    def execute(self, requests):
        batch = [pb_utils.get_input_tensor_by_name(r, self.input).as_numpy() for r in requests]
        sizes = [b.shape[0] for b in batch]
        x = torch.from_numpy(batch[0] if len(batch) == 1 else __import__("numpy").concatenate(batch))
        with torch.inference_mode():
            results = self.module(x.to(self.device))
        if isinstance(results, torch.Tensor):
            results = (results,)
        arrays = [r.float().cpu().numpy() for r in results]
        responses, start = [], 0
        for size in sizes:
            tensors = [pb_utils.Tensor(n, a[start : start + size]) for n, a in zip(self.outputs, arrays)]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
            start += size
        return responses
'''
"""The ``model.py`` of the Python backend, written into each version folder."""
