"""GPU serving benchmark, the serving part of ``bench/gpu.py`` (``python3 bench/gpu.py serve``); prints one
JSON line.

One run, one machine, one model: the trainer's ResNet-18 option (3x224x224, 10 classes, untrained: speed does
not depend on the weights), exported to TorchScript as the trainer exports it.

- raw torch: the TorchScript in this process on the GPU, batch 256, end to end (a pinned host batch to the
  GPU, logits and embeddings back to the host), in float32 and in fp16 channels-last;
- served: the bundled tritonserver on the GPU, the version written by serving's own repository code (the
  Python backend's ``model.py``, GPU instances, dynamic batching), a few configs side by side; 128
  concurrent gRPC clients (8 processes) each sending one image per request, decoded in the client: as a
  preprocessed float32 ``image`` (legs ``<config>-image``) and as its uint8 ``pixels``, which ``model.py``
  normalises on the GPU (legs ``<config>-pixels``; a quarter of the bytes);
- gateway: ``python -m services.serving.gateway`` (default settings: every image kept for feedback, every
  prediction in inference.logged) in front of the fastest config, the same 128 clients sending the JPEG
  bytes (at the model's size: the gateway sends their pixels), measured right after direct Triton on that
  config with pixels.

Targets: served over raw torch (same precision) >= 0.8; gateway over direct Triton >= 0.9. Each served
config's answers are checked against the in-process module first (labels equal, largest logit difference
reported).

It needs serving's packages (fastapi, uvicorn, tritonclient, nats-py, ...) and the nvidia-pytriton wheel
beside torch; on the lent GPU machine they travel packed: ``bench/gpu-carry.sh`` builds ``.gpu/`` here,
``bench/gpu-run.sh`` unpacks it there and runs this. On a CPU: ``.venv/bin/python bench/gpu.py serve
--device cpu --size 32 --seconds 3`` (GPU instances become CPU instances).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import pickle
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from lean import add_gateway_env  # noqa: E402 - bench/ is on the path only now


def progress(stage: str) -> None:
    print(f"bench/gpu.py serve: {stage} ...", file=sys.stderr, flush=True)


# --- the load: client processes --------------------------------------------------------------------------


async def _clients(spec: dict[str, Any]) -> dict[str, Any]:
    """``spec['concurrency']`` loops in this process until ``spec['end']`` (wall clock); requests completed
    inside [start, end] of the measured window count."""
    payloads = pickle.loads(Path(spec["payloads"]).read_bytes())  # noqa: ASYNC240 - before any load
    start, end = spec["start"], spec["end"]
    latencies: list[float] = []
    errors: list[str] = []
    shared: Any = None
    as_bytes: list[int] = []  # shm requests that went as bytes (no region: /dev/shm full, Triton refused)
    if spec["kind"] == "triton":
        import tritonclient.grpc.aio as grpcclient

        client = grpcclient.InferenceServerClient(spec["target"])
        name = spec["input"]
        tensors, datatype = payloads[name], "UINT8" if name == "pixels" else "FP32"

        per_request = spec.get("per_request", 1)
        if spec.get("transport") == "shm":  # the gateway's own regions (services/serving/gateway/shm.py)
            from services.serving.gateway.shm import SharedInputs

            shared = SharedInputs(client, 1024**3, 30.0)

        async def call(i: int) -> None:
            x = np.take(tensors, range(i, i + per_request), axis=0, mode="wrap")
            inputs = [grpcclient.InferInput(name, list(x.shape), datatype)]
            region = await shared.take(x.nbytes) if shared else None
            if shared is not None and region is None:
                as_bytes.append(i)
            if region is not None:
                region.write(x)
                inputs[0].set_shared_memory(region.name, x.nbytes)
            else:
                inputs[0].set_data_from_numpy(x)
            try:
                await client.infer(spec["model"], inputs, model_version="1")
            finally:
                if region is not None:
                    shared.give(region)
    else:
        from lean import LeanHttp

        jpegs, idle = payloads["jpegs"], list[LeanHttp]()
        path = f"/v1/models/{spec['model']}/predict"

        async def call(i: int) -> None:
            connection = idle.pop() if idle else LeanHttp(int(spec["target"]))
            await connection.post(path, jpegs[i % len(jpegs)], "image/jpeg")
            idle.append(connection)

    async def loop(n: int) -> None:
        i = n
        while time.time() < end:
            began = time.time()
            try:
                await call(i)
            except Exception as exc:  # counted and reported; the load goes on
                if began >= start:
                    errors.append(f"{type(exc).__name__}: {str(exc)[:200]}")
            else:
                finished = time.time()
                if start <= finished <= end:
                    latencies.append((finished - began) * 1000)
            i += spec["concurrency"]

    await asyncio.gather(*(loop(n + spec["offset"]) for n in range(spec["concurrency"])))
    if shared is not None:
        if not shared.enabled:
            errors.append("Triton refused the shared-memory regions: the leg sent bytes")
        await shared.stop()
    return {
        "latencies": latencies,
        "errors": errors[:5],
        "error_count": len(errors),
        "sent_as_bytes": len(as_bytes),
    }


def load(
    kind: str,
    target: str,
    model: str,
    payloads: Path,
    args: Any,
    server_pids: list[int] | None = None,
    input_name: str = "image",
    transport: str = "bytes",
) -> dict[str, Any]:
    """``args.clients`` concurrent clients in ``args.processes`` processes against ``target`` (Triton's
    gRPC address, sending ``input_name`` as gRPC bytes or, with ``transport="shm"``, through system shared
    memory; or the gateway's port): requests/s, p50/p99 ms and errors over
    ``args.seconds`` after ``args.warmup`` seconds; with ``server_pids``, their CPU time per request in that
    window."""
    from lean import cpu_seconds

    per = args.clients // args.processes
    start = time.time() + 2.0 + args.warmup  # the processes start within 2 s
    specs = [
        {
            "kind": kind,
            "input": input_name,
            "transport": transport,
            "target": target,
            "model": model,
            "payloads": str(payloads),
            "concurrency": per,
            "per_request": getattr(args, "per_request", 1),
            "offset": p * per,
            "start": start,
            "end": start + args.seconds,
        }
        for p in range(args.processes)
    ]
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, "client", json.dumps(s)], stdout=subprocess.PIPE, text=True
        )
        for s in specs
    ]
    marks: list[float] = []
    timers = [
        threading.Timer(at - time.time(), lambda: marks.append(cpu_seconds(server_pids or [])))
        for at in (start, start + args.seconds)
    ]
    for timer in timers:
        timer.start()
    results = [json.loads(p.communicate(timeout=args.warmup + args.seconds + 120)[0]) for p in procs]
    latencies = [v for r in results for v in r["latencies"]]
    errors = sum(r["error_count"] for r in results)
    first_errors = [e for r in results for e in r["errors"]][:3]
    return {
        "rps": round(len(latencies) / args.seconds, 1),
        "p50_ms": round(float(np.percentile(latencies, 50)), 2) if latencies else None,
        "p99_ms": round(float(np.percentile(latencies, 99)), 2) if latencies else None,
        "errors": errors,
        **({"first_errors": first_errors} if first_errors else {}),
        **({"sent_as_bytes": n} if (n := sum(r.get("sent_as_bytes", 0) for r in results)) else {}),
        **(
            {"server_cpu_ms_per_request": round((marks[1] - marks[0]) * 1000 / max(1, len(latencies)), 3)}
            if server_pids and len(marks) == 2
            else {}
        ),
    }


# --- the legs ---------------------------------------------------------------------------------------------


def raw_torch(model_path: Path, x: np.ndarray, batch: int, half: bool, dev: Any, seconds: float) -> float:
    """Images/s of the TorchScript in this process at ``batch``, host to host, as the Python backend's
    GPU path runs it (pinned host buffer, fp16 channels-last when ``half``)."""
    import torch

    module = torch.jit.load(str(model_path), map_location=dev).eval()
    if half:
        module = module.half().to(memory_format=torch.channels_last)
    host = torch.from_numpy(np.resize(x, (batch, *x.shape[1:])))
    host = host.pin_memory() if dev.type == "cuda" else host

    def step() -> None:
        xb = host.to(dev, non_blocking=True)
        if half:
            xb = xb.half().contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            logits, embedding = module(xb)
        logits.float().cpu()
        embedding.float().cpu()

    torch.backends.cudnn.benchmark = True
    for _ in range(5):  # warm-up: cuDNN autotuning, TorchScript profiling
        step()
    done, began = 0, time.perf_counter()
    while time.perf_counter() - began < seconds:
        step()
        done += batch
    return done / (time.perf_counter() - began)


async def check_answers(url: str, model: str, x: np.ndarray, expected: np.ndarray) -> dict[str, Any]:
    """Triton's logits for ``x`` (float32 images, or uint8 pixels) against ``expected`` (the in-process
    module's, float32)."""
    import tritonclient.grpc.aio as grpcclient

    client = grpcclient.InferenceServerClient(url)
    try:
        name, datatype = ("pixels", "UINT8") if x.dtype == np.uint8 else ("image", "FP32")
        inputs = [grpcclient.InferInput(name, list(x.shape), datatype)]
        inputs[0].set_data_from_numpy(x)
        result = await client.infer(model, inputs, model_version="1")
        logits = result.as_numpy("logits")
    finally:
        await client.close()
    return {
        "labels_equal": bool((logits.argmax(1) == expected.argmax(1)).all()),
        "max_logit_difference": float(np.abs(logits - expected).max()),
    }


def _images(count: int, size: int) -> list[bytes]:
    """``count`` RGB JPEGs (quality 90) of smooth random shapes with some noise, as photos compress."""
    import io

    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for _ in range(count):
        coarse = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        smooth = np.asarray(Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC))
        noisy = np.clip(smooth + rng.normal(0, 8, smooth.shape), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(noisy).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


async def serve_bench(args: Any) -> dict[str, Any]:
    import torch
    from lean import children, rss_mb
    from serve import deploy, export_model, gateway_process, route

    from services.runtime.preprocessing import decode_samples, preprocess_batch
    from services.serving.tritonconfig import TritonOptions
    from services.trainer.training import resolve_device
    from tests.servers import gateway_env, run_nats, run_triton

    dev = resolve_device(args.device)
    gpu = dev.type == "cuda"
    results: dict[str, Any] = {
        "bench": "gpu-serve",
        "device": torch.cuda.get_device_name(dev) if gpu else "cpu",
        "cpu_cores": os.cpu_count(),
        "model": f"resnet (ResNet-18) 3x{args.size}x{args.size}, 10 classes, TorchScript",
        "clients": f"{args.clients} in {args.processes} processes, one image per request",
    }
    with tempfile.TemporaryDirectory(prefix="bench-gpu-serve-") as tmp:
        root = Path(tmp)
        progress("exporting the model, encoding images")
        jpegs = _images(64, args.size)
        folder = root / "model"
        _, spec, model = export_model(folder, jpegs, "resnet", 3, args.size, max_batch=256)
        x = preprocess_batch(jpegs, spec)
        pixels = np.stack([decode_samples(j).transpose(2, 0, 1) for j in jpegs])  # what model.py normalises
        with torch.no_grad():
            expected = model(torch.from_numpy(x[:8]))[0].numpy()
        payloads = root / "payloads.pickle"
        payloads.write_bytes(pickle.dumps({"image": x, "pixels": pixels, "jpegs": jpegs}))

        raw: dict[str, float] = {}
        for precision in ("fp32", "fp16") if gpu else ("fp32",):
            progress(f"raw torch, {precision}, batch {args.batch}")
            rate = raw_torch(folder / "model.pt", x, args.batch, precision == "fp16", dev, args.raw_seconds)
            raw[precision] = round(rate, 1)
        results["raw_torch_images_per_s"] = raw
        if gpu:
            torch.cuda.empty_cache()

        configs = {
            f"{p}-i{i}-b{b}": TritonOptions(
                gpu=gpu, instances=i, max_batch_size=b, max_queue_delay_us=args.delay_us, gpu_precision=p
            )
            for p, i, b in (_config(c) for c in args.configs)
        }
        progress("starting nats-server and tritonserver")
        with run_nats(root / "nats") as nats_server, run_triton(root / "triton") as triton:
            progress(f"loading {len(configs)} configs: {', '.join(configs)}")
            names = {label: f"resnet-{n}" for n, label in enumerate(configs)}
            began = time.perf_counter()
            try:
                repo, url = triton.model_repository, triton.url
                await asyncio.gather(*(deploy(repo, url, folder, names[k], o) for k, o in configs.items()))
            except Exception:
                print(triton.log_path.read_text()[-4000:], file=sys.stderr)  # Triton's own reason
                raise
            results["load_all_configs_s"] = round(time.perf_counter() - began, 1)
            served: dict[str, Any] = {}
            sent = {"image": x, "pixels": pixels}
            for label, options in configs.items():
                for input_name, transport in itertools.product(args.inputs, args.transports):
                    leg: dict[str, Any] = {
                        "options": options.__dict__,
                        "input": input_name,
                        "transport": transport,
                    }
                    try:
                        leg["answers"] = await check_answers(
                            triton.grpc_url, names[label], sent[input_name][:8], expected
                        )
                        progress(f"served {label} ({input_name}, {transport}): {args.clients} clients")
                        url, name = triton.grpc_url, names[label]
                        leg |= load("triton", url, name, payloads, args, None, input_name, transport)
                        baseline = raw[options.gpu_precision if gpu else "fp32"]  # precision: GPU only
                        leg["over_raw_torch"] = round(leg["rps"] / baseline, 3)
                    except Exception as exc:  # reported; the other configs run
                        leg["failed"] = f"{type(exc).__name__}: {exc}"
                    served[f"{label}-{input_name}-{transport}"] = leg
                    print(json.dumps({f"{label}-{input_name}-{transport}": leg}), file=sys.stderr, flush=True)
            results["served"] = served
            ok = {k: v for k, v in served.items() if "rps" in v}
            if not ok or args.gateway_workers == 0:
                return results
            # the gateway sends pixels (its JPEGs are 8-bit and the model's size): the best config for those
            legs = {k: v for k, v in ok.items() if v["input"] == "pixels"} or ok
            best = max(legs, key=lambda k: legs[k]["rps"]).rsplit("-", 2)[0]
            direct_input = "pixels" if "pixels" in args.inputs else "image"
            await route(nats_server, [names[best]])
            env = gateway_env("bench", root / "gateway", nats_server, triton) | {
                "CONVEYOR_GATEWAY_WORKERS": str(args.gateway_workers),
            }
            env |= dict(item.split("=", 1) for item in args.gateway_env)
            progress(f"starting the gateway ({args.gateway_workers} workers) in front of {best}")
            async with gateway_process(env, seconds=60) as (port, gateway):
                workers = children(gateway.pid) or [gateway.pid]  # one worker: uvicorn runs it in-process
                progress(f"direct Triton on {best} again, then the gateway: {args.clients} clients")
                direct = {
                    transport: load(
                        "triton", triton.grpc_url, names[best], payloads, args, None, direct_input, transport
                    )
                    for transport in args.transports
                }
                through = load("gateway", str(port), names[best], payloads, args, workers)
                results["gateway"] = {
                    "config": best,
                    "direct_input": direct_input,
                    "workers": args.gateway_workers,
                    "settings": args.gateway_env,
                    "direct_triton": direct,
                    "gateway": through,
                    "over_direct_triton": {
                        transport: round(through["rps"] / leg["rps"], 3) if leg["rps"] else None
                        for transport, leg in direct.items()
                    },
                    "gateway_cpu_ms_per_request": through.pop("server_cpu_ms_per_request", None),
                    "rss_mb_per_worker": [round(rss_mb(pid)) for pid in workers],
                }
    results["targets"] = {"served_over_raw_torch": 0.8, "gateway_over_direct_triton": 0.9}
    return results


def _config(text: str) -> tuple[Literal["fp32", "fp16"], int, int]:
    """``fp16:2:64`` -> (precision, instances, max batch)."""
    precision, instances, batch = text.split(":")
    if precision not in ("fp32", "fp16"):
        raise SystemExit(f"--config {text!r}: precision is fp32 or fp16")
    return cast(Literal["fp32", "fp16"], precision), int(instances), int(batch)


def _listed(*allowed: str) -> Any:
    """An argparse type: a comma-separated list of ``allowed`` names."""
    import argparse

    def parse(text: str) -> list[str]:
        names = [t for t in text.split(",") if t]
        if not names or set(names) - set(allowed):
            raise argparse.ArgumentTypeError(f"{text!r}: a comma-separated list of {', '.join(allowed)}")
        return names

    return parse


def add_arguments(parser: Any) -> None:
    parser.add_argument("--device", default=None, help="cuda, cpu (default: CUDA when present)")
    parser.add_argument("--size", type=int, default=224, help="image side")
    parser.add_argument("--batch", type=int, default=256, help="raw torch's batch")
    parser.add_argument("--raw-seconds", type=float, default=5.0)
    parser.add_argument(
        "--config",
        dest="configs",
        action="append",
        metavar="PRECISION:INSTANCES:MAX_BATCH",
        help="a served config (repeatable; default fp32:2:64 and fp16:4:128, the best two of 2026-11-26)",
    )
    parser.add_argument("--delay-us", type=int, default=500, help="dynamic batching's max queue delay")
    parser.add_argument(
        "--inputs",
        type=_listed("image", "pixels"),
        default=["image", "pixels"],
        help="what the direct clients send, each a leg: image (float32), pixels (uint8); default both",
    )
    parser.add_argument(
        "--transports",
        type=_listed("bytes", "shm"),
        default=["bytes", "shm"],
        help="how the direct clients send inputs, each a leg: bytes (in the gRPC request), shm (system "
        "shared memory, as the gateway does on Triton's host); default both",
    )
    parser.add_argument("--clients", type=int, default=128)
    parser.add_argument("--processes", type=int, default=8, help="client processes")
    parser.add_argument("--warmup", type=float, default=8.0, help="seconds of load before each measurement")
    parser.add_argument("--seconds", type=float, default=12.0, help="measured seconds of each load")
    parser.add_argument("--gateway-workers", type=int, default=8, help="0: no gateway leg")
    add_gateway_env(parser)


def main(args: Any) -> dict[str, Any]:
    args.configs = args.configs or ["fp32:2:64", "fp16:4:128"]
    return asyncio.run(serve_bench(args))


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "client":
    import structlog

    # stdout carries the one JSON result: the logs of the gateway's code (shm.py) go to stderr
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
    print(json.dumps(asyncio.run(_clients(json.loads(sys.argv[2])))))
