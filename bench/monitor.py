"""Monitor benchmark; prints one JSON line.

In one run, on synthetic traffic shaped like the digits model's (10 classes, 64-dimensional embeddings, four
image statistics, a reference profile in the trainer's layout):

- drift evaluation time per window of 1,000 and 10,000 samples (every test: PSI x2, KS x4, MMD with 200
  permutations), median of several windows (target <= 100 ms for 10,000), and the time to add the samples;
- memory with 100 model versions tracked: each with a full default window (1,000 samples) and its parsed
  reference (target <= 200 MB of RSS growth);
- agreement of each test's verdict with a reference implementation on the same windows (half of them
  shifted): scipy's ``ks_2samp`` for KS; a plain formula for PSI; for MMD, alibi-detect's ``MMDDrift``
  (PyTorch backend) when it is importable (``--alibi-python`` names an interpreter that has it), else an
  independent loop over the permutations;
- the read-back after a restart (a real nats-server): ``--readback-batches`` acked batches of 100 samples in
  the inference stream, all but the last 900 samples in a window KV says is closed; the time
  ``MonitorService.recover`` takes to read them back and rebuild the open window.

Run: ``.venv/bin/python bench/monitor.py`` (``make bench``).
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import structlog
from scipy import stats

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from contracts.events import ImageStats, InferenceSample
from contracts.kv import DriftPolicy, ModelPolicy
from services.monitor.drift import Reference, evaluate
from services.monitor.windows import STAT_FEATURES, Window

LABELS = [str(i) for i in range(10)]
DIM = 64


def progress(stage: str) -> None:
    print(f"bench/monitor.py: {stage} ...", file=sys.stderr, flush=True)


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def profile(rng: np.random.Generator) -> dict[str, Any]:
    """A reference profile in the trainer's layout (``services.trainer.export.reference_profile``)."""
    n = 5000
    confidence = rng.beta(12, 1, n)
    edges = np.linspace(0, 1, 11)
    counts, _ = np.histogram(confidence, bins=edges)
    return {
        "labels": LABELS,
        "count": n,
        "class_frequencies": dict.fromkeys(LABELS, 0.1),
        "confidence": {"edges": edges.tolist(), "counts": counts.tolist(), "mean": float(confidence.mean())},
        "image_stats": {f: {"values": rng.normal(0.3, 0.05, n).tolist()} for f in STAT_FEATURES},
        "embeddings": {"values": np.abs(rng.normal(0, 1, (512, DIM))).tolist()},
    }


def samples(rng: np.random.Generator, n: int, shift: float = 0.0) -> list[InferenceSample]:
    now = datetime.now(UTC)
    labels = rng.integers(0, 10, n)
    confidences = rng.beta(12 / (1 + 40 * shift), 1, n)
    values = rng.normal(0.3 + shift, 0.05, (n, 4))
    embeddings = np.abs(rng.normal(shift * 5, 1, (n, DIM)))
    return [
        InferenceSample.model_construct(
            prediction_id=str(i),
            time=now,
            version=1,
            route="active",
            latency_ms=1.0,
            ok=True,
            error=None,
            label=str(labels[i]),
            confidence=float(confidences[i]),
            image_stats=ImageStats.model_construct(
                mean=values[i, 0], std=values[i, 1], contrast=values[i, 2], sharpness=values[i, 3]
            ),
            embedding=embeddings[i].tolist(),
            shadow=None,
        )
        for i in range(n)
    ]


def filled(model: str, version: int, batch: list[InferenceSample]) -> Window:
    window = Window(model, version, opened=0.0)
    for sample in batch:
        window.add(sample)
    return window


def timing(reference: Reference, rng: np.random.Generator, n: int, repeats: int) -> dict[str, float]:
    adds, evals = [], []
    for _ in range(repeats):
        batch = samples(rng, n)
        started = time.perf_counter()
        window = filled("m", 1, batch)
        adds.append(time.perf_counter() - started)
        started = time.perf_counter()
        evaluate(reference, window.live(), DriftPolicy())
        evals.append(time.perf_counter() - started)
    return {"evaluate_ms": float(np.median(evals) * 1000), "add_ms": float(np.median(adds) * 1000)}


def memory(rng: np.random.Generator, versions: int) -> float:
    gc.collect()
    before = rss_mb()
    tracked = []
    template = samples(rng, 1000)
    for version in range(versions):
        window = filled("m", version + 1, template)
        # Fresh lists per version, as live traffic would give (the template's floats are shared otherwise).
        window.embeddings = [list(e) for e in window.embeddings]
        window.confidences = list(window.confidences)
        window.stats = {f: list(v) for f, v in window.stats.items()}
        tracked.append((window, Reference.from_profile(profile(rng))))
    gc.collect()
    grown = rss_mb() - before
    del tracked
    return grown


def naive_mmd_p(x: np.ndarray, y: np.ndarray, bandwidth: float, permutations: int, seed: int) -> float:
    """An independent permutation test: re-split and recompute the three kernel means each time."""
    z = np.concatenate([x, y])
    d2 = ((z[:, None, :] - z[None, :, :]) ** 2).sum(-1)
    k = np.exp(-d2 / (2 * bandwidth**2))

    def mmd(idx_x: np.ndarray, idx_y: np.ndarray) -> float:
        return float(
            k[np.ix_(idx_x, idx_x)].mean()
            + k[np.ix_(idx_y, idx_y)].mean()
            - 2 * k[np.ix_(idx_x, idx_y)].mean()
        )

    n = len(x)
    observed = mmd(np.arange(n), np.arange(n, len(z)))
    rng = np.random.default_rng(seed + 1000)
    count = 0
    for _ in range(permutations):
        order = rng.permutation(len(z))
        count += mmd(order[:n], order[n:]) >= observed
    return (1 + count) / (1 + permutations)


ALIBI = """
import json, sys, numpy as np
from alibi_detect.cd import MMDDrift
doc = json.load(open(sys.argv[1]))
out = []
for ref, live in doc:
    cd = MMDDrift(np.asarray(ref, dtype=np.float32), backend="pytorch", p_val=0.01, n_permutations=200)
    out.append(float(cd.predict(np.asarray(live, dtype=np.float32))["data"]["p_val"]))
print(json.dumps(out))
"""


def agreement(rng: np.random.Generator, windows: int, alibi_python: str | None) -> dict[str, Any]:
    policy = DriftPolicy()
    reference = Reference.from_profile(profile(rng))
    ours: dict[str, list[bool]] = {"psi": [], "ks": [], "mmd": []}
    theirs: dict[str, list[bool]] = {"psi": [], "ks": [], "mmd": []}
    pairs = []
    for index in range(windows):
        shift = 0.0 if index % 2 == 0 else 0.005 * 2 ** (index % 5)  # 0.005 .. 0.08
        window = filled("m", 1, samples(rng, 1000, shift))
        live = window.live()
        tests = {t.name: t for t in evaluate(reference, live, policy, seed=index)}
        ours["psi"].append(tests["psi.confidence"].drifted)
        histogram, _ = np.histogram(live.confidences, bins=reference.confidence_edges)
        e = np.maximum(reference.confidence_frequencies, 1e-4)
        a = np.maximum(histogram / histogram.sum(), 1e-4)
        theirs["psi"].append(float(np.sum((a - e) * np.log(a / e))) > policy.psi_threshold)
        limit = policy.ks_p_value / len(STAT_FEATURES)
        for feature in STAT_FEATURES:
            ours["ks"].append(tests[f"ks.{feature}"].drifted)
            p = stats.ks_2samp(
                reference.image_stats[feature], live.image_stats[feature], method="exact"
            ).pvalue
            theirs["ks"].append(p < limit)
        ours["mmd"].append(tests["mmd.embedding"].drifted)
        pairs.append((reference.embeddings.tolist(), live.embeddings.tolist()))
        if not alibi_python:
            p = naive_mmd_p(reference.embeddings, live.embeddings, reference.bandwidth, 200, index)
            theirs["mmd"].append(p < policy.mmd_p_value)
    mmd_reference = "naive permutation loop"
    if alibi_python:
        with tempfile.NamedTemporaryFile("w", suffix=".json") as handle:
            json.dump(pairs, handle)
            handle.flush()
            done = subprocess.run(
                [alibi_python, "-c", ALIBI, handle.name], capture_output=True, text=True, timeout=900
            )
        if done.returncode == 0:
            p_values = json.loads(done.stdout.strip().splitlines()[-1])
            theirs["mmd"] = [p < policy.mmd_p_value for p in p_values]
            mmd_reference = "alibi-detect MMDDrift (pytorch)"
        else:
            progress(f"alibi-detect failed, using the naive loop: {done.stderr[-300:]}")
            theirs["mmd"] = [
                naive_mmd_p(np.asarray(r), np.asarray(x), reference.bandwidth, 200, i) < policy.mmd_p_value
                for i, (r, x) in enumerate(pairs)
            ]
    agree = {
        name: float(np.mean(np.array(ours[name]) == np.array(theirs[name]))) for name in ("psi", "ks", "mmd")
    }
    return {
        "windows": windows,
        "agreement": agree,
        "drifted_ours": {k: int(sum(v)) for k, v in ours.items()},
        "drifted_reference": {k: int(sum(v)) for k, v in theirs.items()},
        "references": {"psi": "numpy formula", "ks": "scipy.stats.ks_2samp (exact)", "mmd": mmd_reference},
    }


async def readback(rng: np.random.Generator, batches: int) -> dict[str, Any]:
    """Seconds to rebuild the open window after a restart, from ``batches`` acked batches of 100 samples."""
    import asyncio

    from contracts.events import InferenceLogged
    from deploy.local.natsconf import ADMIN_USER
    from services.monitor.app import build
    from services.monitor.config import MonitorSettings
    from services.monitor.state import VersionRecord, WindowSummary
    from services.runtime.bus import EventBus
    from services.runtime.config import Settings
    from tests.servers import run_nats

    with tempfile.TemporaryDirectory() as tmp, run_nats(Path(tmp)) as server:
        await server.provision("bench", inference_max_bytes=2 * 1024**3)
        common: dict[str, Any] = {"subject_prefix": "bench", "nats_url": server.url, "state_dir": Path(tmp)}
        admin = EventBus(
            Settings(
                **common, service="bench", nats_user=ADMIN_USER, nats_password=server.passwords[ADMIN_USER]
            )
        )
        await admin.broker.connect()
        # one window holds every batch while the monitor first reads them (none closes: no profile needed)
        policy = ModelPolicy(model="m", drift=DriftPolicy(window_size=10**7, window_seconds=3600))
        await (await admin.js.key_value(admin.subjects.kv.policy)).put("m", policy.model_dump_json().encode())
        settings = MonitorSettings(**common, nats_user="monitor", nats_password=server.passwords["monitor"])
        _, service = build(settings)
        closed_end = None
        for i in range(batches):
            batch = samples(rng, 100)
            await admin.publish(InferenceLogged(model="m", batch_id=f"b{i}", sample_rate=1.0, samples=batch))
            if i == batches - 10:
                closed_end = batch[0].time  # all but the last 9 batches are in a closed window
            await asyncio.sleep(0.001 if i < batches - 10 else 0.02)  # later samples, later times
        await service.bus.prepare()  # the monitor's own connection; it reads and acks every batch
        await service.bus.start_consumers()
        stream = settings.subjects.inference_stream
        deadline = time.monotonic() + 600
        while True:
            info = await admin.js.consumer_info(stream, service.consumer.durable)
            if not (info.num_ack_pending or info.num_pending):
                break
            assert time.monotonic() < deadline, "the monitor did not consume the batches"
            await asyncio.sleep(0.2)
        await service.bus.stop_consumers()
        summary = WindowSummary(end=closed_end, closed_at=datetime.now(UTC), samples=1000, outcome="clear")

        def closed(record: Any) -> None:
            record.versions[1] = VersionRecord(windows=[summary], closed=1)

        await service.monitor.state.update("m", closed)
        service.monitor.windows.clear()  # what a restart leaves
        started = time.perf_counter()
        await service.recover()
        seconds = time.perf_counter() - started
        rebuilt = {f"{m}@{v}": w.count for (m, v), w in service.monitor.windows.items()}
        await service.bus.broker.stop()
        await admin.broker.stop()
    return {"batches": batches, "samples": batches * 100, "seconds": round(seconds, 2), "rebuilt": rebuilt}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=7, help="windows timed per size")
    parser.add_argument(
        "--versions", type=int, default=100, help="model versions tracked for the memory figure"
    )
    parser.add_argument("--windows", type=int, default=20, help="windows compared with the references")
    parser.add_argument("--alibi-python", help="a Python interpreter with alibi-detect installed")
    parser.add_argument(
        "--readback-batches", type=int, default=1000, help="acked batches of 100 samples to read back"
    )
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    reference = Reference.from_profile(profile(rng))
    result: dict[str, Any] = {"bench": "monitor", "embedding_dim": DIM}
    for n in (1000, 10_000):
        progress(f"timing windows of {n} samples")
        result[f"window_{n}"] = timing(reference, rng, n, args.repeats)
    result["target_evaluate_10000_ms"] = 100
    progress(f"memory with {args.versions} versions tracked")
    result["memory_mb_100_versions"] = round(memory(rng, args.versions), 1)
    result["target_memory_mb"] = 200
    progress(f"verdict agreement on {args.windows} windows")
    result["agreement"] = agreement(rng, args.windows, args.alibi_python)
    progress(f"read-back after a restart: {args.readback_batches} batches of 100 samples")
    import asyncio

    result["readback"] = asyncio.run(readback(rng, args.readback_batches))
    print(json.dumps(result))


if __name__ == "__main__":
    # The monitor's log lines (the read-back) go to stderr with the progress lines; stdout carries the JSON.
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
    main()
