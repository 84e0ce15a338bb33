"""Serving benchmark; prints one JSON line.

One machine, one model (the trainer's small CNN on 32x32 digits, exported as the trainer exports it), served
by the bundled tritonserver through serving's own repository code, two configs side by side: dynamic
batching on and off. Both Triton and gateway legs start from the same PNG bytes:

(a) in-process TorchScript (decode + preprocess + forward in the bench process);
(b) Triton gRPC directly: the client decodes and preprocesses, then sends the tensor;
(c) the gateway (``python -m services.serving.gateway``, 2 workers, default settings: every image kept for
    feedback, every prediction in inference.logged): the client sends the bytes.

With one client, (b) and (c) alternate request by request, so both legs see the same machine (on a noisy
2-core machine two runs a few seconds apart differ by up to 2x): p50 latency of each, the gateway's added p50
over (b) (target <= 1 ms) and its CPU time per request. The gateway's client is a lean keep-alive HTTP/1.1
client on a raw socket, as a load generator is; with httpx as the client (reported beside it) its own CPU
per request, ≈4 ms here, counts as the gateway's. With 32 concurrent clients: throughput of (c) over (b)
(on 2 cores the gateway and Triton share the CPU), and dynamic batching on over off for (b) (target >=
1.5x); and the gateway against the same gateway joining no requests (``CONVEYOR_GATEWAY_TRITON_IN_FLIGHT=0``,
started beside it), two rounds alternating: requests/s and the gateway's CPU per request of each. The
gateway's RSS per worker (target <= 300 MB).

Run: ``.venv/bin/python bench/serve.py`` (``make bench``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lean import LeanHttp, add_gateway_env, children, cpu_seconds, rss_mb

from contracts.kv import RolloutState
from contracts.names import Subjects
from services.runtime.preprocessing import PreprocessSpec, fit_spec, preprocess, preprocess_batch
from services.serving.repository import ModelRepository
from services.serving.triton import TritonAdmin
from services.serving.tritonconfig import TritonOptions
from services.trainer.export import export_torchscript, serving_spec
from services.trainer.model import Architecture, build_model
from tests import images
from tests.servers import NatsServer, free_port, gateway_env, run_nats, run_triton, wait_until_ok

PREFIX = "bench"
ROOT = Path(__file__).resolve().parents[1]


def progress(stage: str) -> None:
    print(f"bench/serve.py: {stage} ...", file=sys.stderr, flush=True)


def export_model(
    folder: Path,
    images: list[bytes],
    architecture: Architecture = "small_cnn",
    channels: int = 1,
    size: int = 32,
    max_batch: int = 64,
) -> tuple[dict[str, Any], PreprocessSpec, torch.nn.Module]:
    """The trainer's ``architecture`` with 10 classes, untrained (speed does not depend on weights), its
    preprocessing fitted on ``images``, exported like the trainer into ``folder`` with its serving spec:
    (the serving spec, the preprocessing, the module)."""
    spec = fit_spec(images[:200], size=size, channels=channels)
    model = build_model(architecture, channels, 10, size, seed=0).eval()
    x = preprocess_batch(images[:2], spec)
    folder.mkdir(parents=True, exist_ok=True)
    export_torchscript(model, x, folder / "model.pt")
    with torch.no_grad():
        embedding = model(torch.from_numpy(x))[1].shape[1]
    labels = [str(i) for i in range(10)]
    serving = serving_spec(
        (channels, size, size),
        labels,
        int(embedding),
        onnx=False,
        max_batch_size=max_batch,
        preprocessing=spec.to_dict(),
    )
    (folder / "serving_spec.json").write_text(json.dumps(serving))
    return serving, spec, model


def write_version(repo_root: Path, model_dir: Path, name: str, options: TritonOptions) -> None:
    """Version 1 of ``name`` in the repository, through serving's own repository code."""
    repo = ModelRepository(repo_root, options)
    with tempfile.TemporaryDirectory() as tmp:
        staged = Path(tmp) / "files"
        staged.mkdir()
        for f in model_dir.iterdir():
            (staged / f.name).write_bytes(f.read_bytes())
        repo.install(name, 1, staged, {})
    repo.write_config(name, {1})


async def deploy(
    repo_root: Path, triton_url: str, model_dir: Path, name: str, options: TritonOptions
) -> None:
    await asyncio.to_thread(write_version, repo_root, model_dir, name, options)
    admin = TritonAdmin(triton_url)
    await admin.load(name, 300)
    await admin.wait_ready(name, 1, 300)


async def route(nats_server: NatsServer, names: list[str]) -> None:
    """The streams the gateway needs, and version 1 active for each of ``names`` in the rollout KV (what
    the registry would write)."""
    import nats

    await nats_server.provision(PREFIX)
    nc = await nats.connect(**nats_server.connect_kwargs())
    kv = await nc.jetstream().key_value(Subjects(PREFIX).kv.rollout)
    for name in names:
        await kv.put(name, RolloutState(model=name, active_version=1, revision=1).model_dump_json().encode())
    await nc.close()


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


async def run_clients(
    call: Any, payloads: list[Any], clients: int, seconds: float
) -> tuple[float, list[float]]:
    """``clients`` loops calling ``call(payload)`` for ``seconds``; (requests/s, latencies ms)."""
    latencies: list[float] = []
    stop = time.perf_counter() + seconds

    async def loop(n: int) -> None:
        i = n
        while time.perf_counter() < stop:
            started = time.perf_counter()
            await call(payloads[i % len(payloads)])
            latencies.append((time.perf_counter() - started) * 1000)
            i += clients

    began = time.perf_counter()
    await asyncio.gather(*(loop(n) for n in range(clients)))
    return len(latencies) / (time.perf_counter() - began), latencies


async def paired(
    first: Any, second: Any, payloads: list[Any], seconds: float
) -> tuple[list[float], list[float]]:
    """One client calling ``first`` and ``second`` in turn on the same payload for ``seconds``; the latencies
    (ms) of each."""
    a: list[float] = []
    b: list[float] = []
    stop = time.perf_counter() + seconds
    i = 0
    while time.perf_counter() < stop:
        for call, into in ((first, a), (second, b)):
            started = time.perf_counter()
            await call(payloads[i % len(payloads)])
            into.append((time.perf_counter() - started) * 1000)
        i += 1
    return a, b


ALONE = {"CONVEYOR_GATEWAY_TRITON_IN_FLIGHT": "0"}  # a gateway that joins no requests


@contextlib.asynccontextmanager
async def gateway_process(
    env: dict[str, str], seconds: float = 30
) -> AsyncIterator[tuple[int, subprocess.Popen[bytes]]]:
    """``python -m services.serving.gateway`` with ``env`` on a free port, once it answers ready (within
    ``seconds``)."""
    port = free_port()
    argv = [sys.executable, "-m", "services.serving.gateway"]
    env = env | {"CONVEYOR_GATEWAY_PORT": str(port)}
    gateway = subprocess.Popen(argv, env=env, cwd=ROOT)  # noqa: ASYNC220 - before any measuring
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
            await wait_until_ok(http, "/readyz", seconds=seconds, alive=lambda: gateway.poll() is None)
        yield port, gateway
    finally:
        gateway.terminate()
        gateway.wait(timeout=30)


async def main(seconds: float, extra_env: dict[str, str]) -> dict[str, Any]:
    import tritonclient.grpc.aio as grpcclient

    pngs = [d for _, _, d in images.digits_images(400)]
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        root = Path(tmp)
        progress("exporting the model")
        spec_doc, spec, _ = export_model(root / "model", pngs)
        progress("starting nats-server and tritonserver")
        with run_nats(root / "nats") as nats_server, run_triton(root / "triton") as triton:
            for name, batching in (("bench", True), ("bench-nobatch", False)):
                options = TritonOptions(dynamic_batching=batching, max_queue_delay_us=500)
                await deploy(triton.model_repository, triton.url, root / "model", name, options)
            await route(nats_server, ["bench", "bench-nobatch"])

            # (a) in process
            module = torch.jit.load(str(root / "model" / "model.pt")).eval()
            torch.set_num_threads(1)
            in_process = []
            for png in pngs[:300]:
                started = time.perf_counter()
                with torch.no_grad():
                    module(torch.from_numpy(preprocess(png, spec)[None]))
                in_process.append((time.perf_counter() - started) * 1000)

            # (b) Triton gRPC directly, the client preprocessing
            client = grpcclient.InferenceServerClient(triton.grpc_url)

            def direct(model: str) -> Any:
                async def call(png: bytes) -> None:
                    x = preprocess(png, spec)[None]
                    inputs = [grpcclient.InferInput("image", list(x.shape), "FP32")]
                    inputs[0].set_data_from_numpy(x)
                    await client.infer(model, inputs, model_version="1")

                return call

            # (c) the gateway, two workers; beside it the same gateway joining no requests
            env = gateway_env(PREFIX, root / "gateway", nats_server, triton) | extra_env
            alone_env = env | ALONE | {"CONVEYOR_STATE_DIR": str(root / "gateway-alone")}
            progress("starting the gateway, and one that joins no requests")
            async with (
                gateway_process(env) as (port, gateway),
                gateway_process(alone_env) as (alone, alone_gateway),
            ):
                async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
                    idle: dict[int, list[LeanHttp]] = {port: [], alone: []}  # a connection per client

                    def through_gateway(model: str, port: int = port) -> Any:
                        async def call(png: bytes) -> None:
                            connection = idle[port].pop() if idle[port] else LeanHttp(port)
                            await connection.post(f"/v1/models/{model}/predict", png, "image/png")
                            idle[port].append(connection)

                        return call

                    async def through_httpx(png: bytes) -> None:
                        r = await http.post(
                            "/v1/models/bench-nobatch/predict",
                            content=png,
                            headers={"Content-Type": "image/png"},
                        )
                        r.raise_for_status()

                    results: dict[str, Any] = {}
                    workers = children(gateway.pid)
                    for model in ("bench", "bench-nobatch"):
                        b, c = direct(model), through_gateway(model)
                        await paired(b, c, pngs, 1.0)  # warm-up
                        progress(f"{model}: one client, Triton gRPC and the gateway in turn")
                        cpu_before = cpu_seconds(workers)
                        lat_b, lat_c = await paired(b, c, pngs, seconds)
                        cpu_per_request = (cpu_seconds(workers) - cpu_before) / len(lat_c)
                        for leg, call in (("triton", b), ("gateway", c)):
                            progress(f"{leg} {model}: 32 clients")
                            rate32, lat32 = await run_clients(call, pngs, 32, seconds)
                            results[f"{leg}.{model}"] = {
                                "p50_ms_1_client": round(
                                    statistics.median(lat_b if leg == "triton" else lat_c), 3
                                ),
                                "rps_32_clients": round(rate32, 1),
                                "p99_ms_32_clients": round(percentile(lat32, 99), 2),
                            }
                        results[f"gateway.{model}"]["cpu_ms_per_request"] = round(cpu_per_request * 1000, 3)
                    joining: dict[str, dict[str, list[float]]] = {}
                    for _ in range(2):  # rounds, alternating: this machine drifts
                        for leg, p, pids in (
                            ("joined", port, workers),
                            ("alone", alone, children(alone_gateway.pid)),
                        ):
                            progress(f"gateway, requests {leg}, bench: 32 clients")
                            cpu_before = cpu_seconds(pids)
                            rate32, lat32 = await run_clients(through_gateway("bench", p), pngs, 32, seconds)
                            figures = joining.setdefault(leg, {"rps": [], "cpu_ms_per_request": []})
                            figures["rps"].append(round(rate32, 1))
                            cpu_ms = (cpu_seconds(pids) - cpu_before) / len(lat32) * 1000
                            figures["cpu_ms_per_request"].append(round(cpu_ms, 3))
                    progress("httpx as the gateway's client, one client")
                    lat_b, lat_httpx = await paired(direct("bench-nobatch"), through_httpx, pngs, seconds)
                    rss = [round(rss_mb(pid), 1) for pid in workers]
                    for connection in [c for pool in idle.values() for c in pool]:
                        await connection.close()
            await client.close()
    b, c = results["triton.bench"], results["gateway.bench"]
    return {
        "bench": "serve",
        "model": f"small_cnn 1x32x32, {len(spec_doc['labels'])} classes, python backend, CPU",
        "in_process_p50_ms": round(statistics.median(in_process), 3),
        "legs": results,
        "gateway_added_p50_ms": round(c["p50_ms_1_client"] - b["p50_ms_1_client"], 3),
        "gateway_added_p50_ms_no_batching": round(
            results["gateway.bench-nobatch"]["p50_ms_1_client"]
            - results["triton.bench-nobatch"]["p50_ms_1_client"],
            3,
        ),
        "gateway_cpu_ms_per_request": c["cpu_ms_per_request"],
        "gateway_added_p50_ms_httpx_client_no_batching": round(
            statistics.median(lat_httpx) - statistics.median(lat_b), 3
        ),
        "gateway_over_triton_32_clients": round(c["rps_32_clients"] / b["rps_32_clients"], 3),
        "gateway_joining_32_clients": joining,
        "gateway_joining_on_over_off_32_clients": round(
            sum(joining["joined"]["rps"]) / sum(joining["alone"]["rps"]), 3
        ),
        "dynamic_batching_on_over_off_32_clients": round(
            b["rps_32_clients"] / results["triton.bench-nobatch"]["rps_32_clients"], 3
        ),
        "gateway_rss_mb_per_worker": rss,
        "cpu_cores": os.cpu_count(),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each measured run")
    add_gateway_env(parser)
    args = parser.parse_args()
    extra = dict(item.split("=", 1) for item in args.gateway_env)
    print(json.dumps(asyncio.run(main(args.seconds, extra))))
