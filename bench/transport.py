"""What Triton's Python backend costs per request as the input's bytes grow; prints one JSON line.

A near-free model (the mean of each channel, then a linear layer: no compute to speak of), 3 x S x S,
deployed by serving's own repository code into the bundled tritonserver, and concurrent gRPC clients sending
``--per-request`` images per request (default one) in four legs, alternating leg by leg over ``--rounds``
rounds: ``image`` (float32, preprocessed in the client) or ``pixels`` (the uint8 samples, a quarter of the
bytes, normalised by ``model.py``), each as ``bytes`` in the gRPC request or through ``shm`` (a system
shared-memory region registered with Triton, the gateway's own code: ``services/serving/gateway/shm.py``).
What separates the legs is the transport: the client's serialisation, tritonserver's gRPC frontend and the
copy into the backend's stub. Both inputs answer the same logits (checked first).

Run: ``.venv/bin/python bench/transport.py`` (CPU instances); ``--device cuda`` on a GPU machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import pickle
import sys
import tempfile
import types
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from gpu_serve import _images, check_answers, load, progress  # noqa: E402 - bench/ is on the path only now
from serve import deploy  # noqa: E402


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from services.runtime.preprocessing import decode_samples, fit_spec, preprocess_batch
    from services.serving.tritonconfig import TritonOptions
    from services.trainer.export import export_torchscript, serving_spec
    from tests.servers import run_triton

    class MeanThenLinear(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(3, 10)

        def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            embedding = image.mean(dim=(2, 3))
            return self.fc(embedding), embedding

    gpu = args.device == "cuda"
    with tempfile.TemporaryDirectory(prefix="bench-transport-") as tmp:
        root = Path(tmp)
        jpegs = _images(32, args.size)
        spec = fit_spec(jpegs, size=args.size, channels=3)
        sent = {
            "image": preprocess_batch(jpegs, spec),
            "pixels": np.stack([decode_samples(j).transpose(2, 0, 1) for j in jpegs]),
        }
        folder = root / "model"
        folder.mkdir()
        module = MeanThenLinear().eval()
        export_torchscript(module, sent["image"][:2], folder / "model.pt")
        labels = [str(i) for i in range(10)]
        doc = serving_spec(
            (3, args.size, args.size), labels, 3, onnx=False, max_batch_size=64, preprocessing=spec.to_dict()
        )
        (folder / "serving_spec.json").write_text(json.dumps(doc))
        payloads = root / "payloads.pickle"
        payloads.write_bytes(pickle.dumps(sent | {"jpegs": jpegs}))
        with torch.no_grad():
            expected = module(torch.from_numpy(sent["image"][:8]))[0].numpy()
        load_args = types.SimpleNamespace(
            clients=args.clients,
            processes=args.processes,
            seconds=args.seconds,
            warmup=args.warmup,
            per_request=args.per_request,
        )
        results: dict[str, Any] = {
            "bench": "transport",
            "device": args.device,
            "model": f"mean then linear, 3x{args.size}x{args.size}",
            "clients": f"{args.clients} in {args.processes} processes",
            "images_per_request": args.per_request,
            "bytes_per_request": {name: int(x[0].nbytes) for name, x in sent.items()},
        }
        progress("starting tritonserver")
        with run_triton(root / "triton") as triton:
            await deploy(triton.model_repository, triton.url, folder, "tiny", TritonOptions(gpu=gpu))
            legs: dict[str, list[float]] = {
                f"{name}-{transport}": [] for name in sent for transport in ("bytes", "shm")
            }
            for name, x in sent.items():
                results[f"answers_{name}"] = await check_answers(triton.grpc_url, "tiny", x[:8], expected)
            for round_ in range(args.rounds):
                for leg_name in legs:
                    name, transport = leg_name.split("-")
                    progress(f"round {round_ + 1}: {name} as {transport}")
                    leg = load("triton", triton.grpc_url, "tiny", payloads, load_args, None, name, transport)
                    if leg["errors"]:
                        raise SystemExit(
                            f"{leg_name}: {leg['errors']} failed requests: {leg.get('first_errors')}"
                        )
                    legs[leg_name].append(leg["rps"] * args.per_request)
        results["images_per_s"] = legs

        def ratios(a: str, b: str) -> list[float]:
            return [round(x / y, 2) for x, y in zip(legs[a], legs[b], strict=True)]

        results["pixels_over_image"] = {t: ratios(f"pixels-{t}", f"image-{t}") for t in ("bytes", "shm")}
        results["shm_over_bytes"] = {n: ratios(f"{n}-shm", f"{n}-bytes") for n in sent}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="Triton instances' kind")
    parser.add_argument("--size", type=int, default=224, help="image side")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--processes", type=int, default=2, help="client processes")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of load before each measurement")
    parser.add_argument("--seconds", type=float, default=8.0, help="measured seconds of each leg")
    parser.add_argument("--per-request", type=int, default=1, help="images per request")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of the four legs, alternating")
    print(json.dumps(asyncio.run(bench(parser.parse_args()))))


if __name__ == "__main__":
    main()
