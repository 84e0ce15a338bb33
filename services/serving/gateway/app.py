"""The inference gateway: FastAPI in front of Triton, routing each request by the model's rollout state.

Imports no torch: images are decoded and preprocessed by ``services/runtime/preprocessing.py`` (numpy and
Pillow, exactly as in training), then sent to Triton over pooled gRPC channels. A request whose images are
all 8-bit PNGs or JPEGs already the model's size and channels goes as their uint8 samples to a version that
takes ``pixels`` (the Python backend's ``model.py`` normalises them, to the same bits): a quarter of the
bytes, and no float conversion here.

==============================================  =============================================================
``POST /v1/models/{model}/feedback``            ``{"prediction_id": ..., "label": "3"}``: the true label of an
                                                earlier prediction; its image lands in the incoming bucket as
                                                ``<dataset>/<label>/feedback-<id>.<ext>`` (new labelled data)
``POST /v1/models/{model}/predict``             multipart files, raw image bytes (``image/*`` or
                                                ``application/octet-stream``), or JSON ``{"image": b64}`` /
                                                ``{"images": [b64, ...]}``; ``X-Request-Key`` makes canary
                                                routing sticky; answers ids, labels, probabilities,
                                                version and route
``GET  /v1/models``                             the routed models and their rollout state
``GET  /v1/models/{model}``                     one model: each routed version's routes, readiness in
                                                Triton, labels and input (size, channels, normalisation)
``GET  /healthz``, ``/readyz``, ``/metrics``    live; ready when every routed version is ready in Triton
==============================================  =============================================================

Errors, each ``{"error": <code>, "detail": <what is wrong>}``: 400 (unparsable multipart), 401 (API key),
404 (unknown model, or no such path), 405 (a method the path does not take), 413 (body too large, too many
images), 415 (not an image type), 422 (an image that cannot be decoded, with the reason), 503 with
Retry-After (no deployed version, Triton down), 504 (timeout).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import hmac
import io
import itertools
import json
import os
import random
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
import orjson
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.types import Receive, Scope, Send

from contracts.events import Feedback, ImageStats, InferenceLogged, InferenceSample, ShadowResult
from contracts.kv import RolloutState
from contracts.names import validate_name
from services.runtime.bus import EventBus
from services.runtime.inference_log import InferenceLogger
from services.runtime.policy import Policies
from services.runtime.preprocessing import (
    ImageDecodeError,
    UnsupportedImageFormat,
    decode_samples,
    image_stats,
    normalise,
    normalise_pixels,
    pages_for,
    prepare,
)
from services.runtime.s3 import s3_client
from services.runtime.tasks import cancel
from services.runtime.telemetry import get_logger, setup_logging
from services.serving.gateway.catalog import Catalog, ServedSpec
from services.serving.gateway.config import GatewaySettings
from services.serving.gateway.joiner import Joiner, Rows
from services.serving.gateway.kept import Kept
from services.serving.gateway.routing import Route, choose, mirror
from services.serving.gateway.shm import SharedInputs

__all__ = ["Gateway", "create_app"]

RETRY_AFTER_S = "2"
# Smaller bodies are decoded on the event loop: handing them to a thread costs more (≈70-100 µs here) than
# decoding a small image; larger ones go to a thread so the loop keeps serving other requests meanwhile.
INLINE_DECODE_BYTES = 64 * 1024
# Answered predictions whose work after the answer is still running; beyond, NATS is taking no more writes
# and the images of further predictions are not kept (counted in conveyor_gateway_images_not_kept).
MAX_IMAGES_BEING_KEPT = 256
FEEDBACK_MAX_BYTES = 64 * 1024  # a feedback body is a prediction id and a label
INLINE_STATS_VALUES = 128 * 128  # statistics of larger prepared images are computed in a thread
_EXTENSIONS = {b"\x89PNG": "png", b"\xff\xd8\xff": "jpg", b"II*\x00": "tif", b"MM\x00*": "tif"}


PREDICT_RESPONSE: dict[str, Any] = {
    "description": "one prediction per image, in the order sent",
    "content": {
        "application/json": {
            "example": {
                "model": "digits",
                "version": 3,
                "route": "active",
                "predictions": [
                    {
                        "prediction_id": "0d6c4b1e9f5a4f7e8a3c2b1d0e9f8a7b",
                        "label": "7",
                        "confidence": 0.982,
                        "probabilities": {"1": 0.011, "7": 0.982, "9": 0.007},
                    }
                ],
            }
        }
    },
}


PREDICT_PATH = re.compile(r"/v1/models/([^/]+)/predict")  # the route's own pattern ({model}: [^/]+)


class GatewayApp(FastAPI):
    """FastAPI, with ``POST /v1/models/{model}/predict`` handed straight to its endpoint: no middleware
    stack, router or dependency solving in between (≈110-130 µs less per request on the 2-core machine,
    measured with a one-client loop against uvicorn). The route stays registered for the OpenAPI document;
    every other path goes through FastAPI as usual. The endpoint answers its own errors
    (``error_response``)."""

    predict_endpoint: Callable[[str, Request], Awaitable[Response]] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and self.predict_endpoint is not None:
            matched = PREDICT_PATH.fullmatch(scope["path"])
            if matched:
                # as Starlette sets it: then Request.form() raises HTTPException, which read_images answers
                scope["app"] = self
                response = await self.predict_endpoint(matched.group(1), Request(scope, receive))
                await response(scope, receive, send)
                return
        await super().__call__(scope, receive, send)


class ApiError(Exception):
    def __init__(self, status: int, error: str, detail: str, retry_after: str | None = None) -> None:
        super().__init__(detail)
        self.status, self.error, self.detail, self.retry_after = status, error, detail, retry_after
        self.served: tuple[int, Route] | None = None  # the version and route chosen before it failed


def timed_out(seconds: float) -> ApiError:
    return ApiError(504, "timeout", f"no answer within {seconds:.1f} s", RETRY_AFTER_S)


def error_response(exc: ApiError) -> JSONResponse:
    """``{"error": <code>, "detail": <what is wrong>}`` with the status, and Retry-After when there is one."""
    headers = {"Retry-After": exc.retry_after} if exc.retry_after else None
    return JSONResponse({"error": exc.error, "detail": exc.detail}, exc.status, headers=headers)


@dataclass
class Answer:
    version: int
    route: Route
    logits: np.ndarray
    embedding: np.ndarray | None
    latency_ms: float


class Gateway:
    """One worker's state: the catalog, the Triton channels, the inference log and the shadow queue."""

    def __init__(self, settings: GatewaySettings, bus: EventBus | None = None) -> None:
        import tritonclient.grpc.aio as grpcclient

        self.settings = settings
        self.bus = bus or EventBus(settings.model_copy(update={"service": "gateway"}))
        kv = settings.subjects.kv
        self.catalog = Catalog(lambda: self.bus.js, kv.rollout, kv.policy, settings.model_repository)
        self.grpc = grpcclient
        self._clients = [
            grpcclient.InferenceServerClient(settings.triton_grpc_url)
            for _ in range(settings.gateway_grpc_channels)
        ]
        self._next = itertools.cycle(self._clients)
        self.shm = SharedInputs(
            self._clients[0], settings.gateway_shared_memory_mb * 1024**2, settings.gateway_request_timeout_s
        )
        self.joiner = Joiner(settings.gateway_triton_in_flight)
        self.inference_log = InferenceLogger(self.bus, sample_rate=settings.gateway_inference_sample_rate)
        self.shadow_queue: asyncio.Queue[tuple[str, np.ndarray, Answer, list[InferenceSample]]] = (
            asyncio.Queue(settings.gateway_shadow_queue)
        )
        self._shadow_tasks: list[asyncio.Task[None]] = []
        self.policies = Policies(lambda: self.bus.js, settings.subjects.kv.policy)
        self._after: set[asyncio.Task[None]] = set()  # the work of answered predictions (_after_answer)
        self.kept = Kept(lambda: self.bus.nc, lambda: self.bus.js, settings.subjects.predictions_store)
        self.s3 = s3_client(settings)  # feedback images go to the incoming bucket
        self.log = get_logger(component="gateway")
        self.metrics = CollectorRegistry()
        self.requests = Counter(
            "conveyor_gateway_requests",
            "Predict requests by model, version, route and status code (version and route empty when none "
            "was chosen; model empty for a name the gateway does not know)",
            ["model", "version", "route", "status"],
            registry=self.metrics,
        )
        self.latency = Histogram(
            "conveyor_gateway_request_seconds",
            "Predict request time, whatever the answer (model empty for a name the gateway does not know)",
            ["model"],
            registry=self.metrics,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10),
        )
        self.triton_batch = Histogram(
            "conveyor_gateway_triton_request_images",
            "Images in each request to Triton (concurrent predict requests join them: see "
            "CONVEYOR_GATEWAY_TRITON_IN_FLIGHT)",
            registry=self.metrics,
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
        )
        self.shadow_dropped = Counter(
            "conveyor_gateway_shadow_dropped",
            "Mirrored requests dropped: the shadow queue was full",
            ["model"],
            registry=self.metrics,
        )
        self.images_not_kept = Counter(
            "conveyor_gateway_images_not_kept",
            "Predicted images not kept for feedback (too many puts in flight, or the store refused)",
            ["model"],
            registry=self.metrics,
        )
        self.shadow_failed = Counter(
            "conveyor_gateway_shadow_failed",
            "Mirrored requests the shadow version did not answer (Triton's error is in the log)",
            ["model"],
            registry=self.metrics,
        )
        self.shadow_compared = Counter(
            "conveyor_gateway_shadow_compared",
            "Mirrored requests answered by the shadow, by agreement with the answer returned",
            ["model", "agrees"],
            registry=self.metrics,
        )

    # ---- lifecycle ---------------------------------------------------------------------------------------

    async def start(self) -> None:
        await self.bus.broker.connect()
        await self.catalog.start()
        await self.inference_log.start()
        await self.shm.start()
        self._shadow_tasks = [asyncio.create_task(self._shadow_worker()) for _ in range(2)]

    async def stop(self) -> None:
        if self._after:  # answered predictions still logging or keeping their images
            await asyncio.wait(self._after, timeout=5)
        for task in self._shadow_tasks:
            await cancel(task)
        await self.joiner.stop()
        await self.catalog.stop()
        await self.inference_log.stop()
        await self.shm.stop()
        for client in self._clients:
            await client.close()
        await self.bus.broker.stop()
        self.bus.flush()  # the traces still batched

    # ---- predict -----------------------------------------------------------------------------------------

    async def predict(
        self, model: str, images: list[bytes], key: str | None, deadline: float
    ) -> dict[str, Any]:
        """``images`` answered by the version the rollout state routes ``key`` to, by ``deadline`` (the
        event loop's clock) or a 504."""
        state = self.state_of(model)
        chosen = choose(state, key)
        if chosen is None:
            raise ApiError(503, "not_deployed", f"model {model!r} has no version to serve yet", RETRY_AFTER_S)
        timeout = asyncio.timeout_at(deadline)
        try:
            async with timeout:
                return await self._predict(model, state, *chosen, images, timeout)
        except TimeoutError as exc:
            error = timed_out(self.settings.gateway_request_timeout_s)
            error.served = chosen
            raise error from exc
        except ApiError as exc:
            exc.served = chosen
            raise

    async def _predict(
        self,
        model: str,
        state: RolloutState,
        version: int,
        route: Route,
        images: list[bytes],
        timeout: asyncio.Timeout,
    ) -> dict[str, Any]:
        spec = self._spec(model, version)
        policy = self.catalog.sampling(model)
        sampled = self.inference_log.sampled(model, policy.inference_log_rate if policy else None)
        try:
            if sum(map(len, images)) <= INLINE_DECODE_BYTES:
                batch, prepared = _prepare_all(images, spec, sampled)
            else:
                batch, prepared = await asyncio.to_thread(_prepare_all, images, spec, sampled)
        except UnsupportedImageFormat as exc:
            raise ApiError(415, "unsupported_image", str(exc)) from exc
        except ImageDecodeError as exc:
            raise ApiError(422, "undecodable_image", str(exc)) from exc
        started = time.perf_counter()
        try:
            answer = await self._infer(model, version, route, spec, batch)
        except (ApiError, asyncio.CancelledError) as exc:
            # the monitor counts failed requests per version (canary error rate), timeouts too
            error = exc.error if isinstance(exc, ApiError) else "timeout" if timeout.expired() else None
            if sampled and error:
                self._log(model, _failed(len(images), version, route, started, error, _stats(prepared)))
            raise
        probabilities = _softmax(answer.logits)
        top = probabilities.argmax(axis=1).tolist()
        rows = probabilities.round(6).tolist()
        predictions = [
            {
                "prediction_id": uuid.uuid4().hex,
                "label": spec.labels[top[i]],
                "confidence": rows[i][top[i]],
                "probabilities": dict(zip(spec.labels, rows[i], strict=False)),
            }
            for i in range(len(images))
        ]
        keep = self.settings.gateway_keep_images
        if keep and len(self._after) >= MAX_IMAGES_BEING_KEPT:  # NATS takes no more: these are not kept
            self.images_not_kept.labels(model).inc(len(images))
            keep = False
        task = asyncio.create_task(
            self._after_answer(model, state, answer, predictions, images if keep else [], batch, prepared)
        )
        self._after.add(task)
        task.add_done_callback(self._after.discard)
        return {"model": model, "version": version, "route": route, "predictions": predictions}

    async def _after_answer(
        self,
        model: str,
        state: RolloutState,
        answer: Answer,
        predictions: list[dict[str, Any]],
        images: list[bytes],
        batch: np.ndarray,
        prepared: list[np.ndarray],
    ) -> None:
        """What a prediction leaves for after its response is written (a task: it starts once the request's
        own coroutine has written the response): the statistics and samples of a sampled request, the
        shadow mirror, keeping the images for feedback."""
        try:
            samples: list[InferenceSample] = []
            if prepared:
                small = prepared[0].size <= INLINE_STATS_VALUES
                stats = _stats(prepared) if small else await asyncio.to_thread(_stats, prepared)
                samples = self._samples(stats, answer, predictions)
            if mirror(state, answer.version) is not None:
                try:
                    self.shadow_queue.put_nowait((model, batch, answer, samples))
                except asyncio.QueueFull:
                    self.shadow_dropped.labels(model).inc()
                    self._log(model, samples)
            else:
                self._log(model, samples)
            if images:
                await self._put_images(model, answer.version, predictions, images)
        except Exception as exc:  # never the request's failure: it is answered already
            self.log.warning("work after the answer failed", model=model, error=repr(exc))

    # ---- feedback ----------------------------------------------------------------------------------------

    async def _put_images(
        self, model: str, version: int, predictions: list[dict[str, Any]], images: list[bytes]
    ) -> None:
        """Keep the images in the predictions object store, so that feedback can label them."""
        try:
            for prediction, image in zip(predictions, images, strict=True):
                about = {"model": model, "version": version, "label": prediction["label"]}
                await self.kept.put(prediction["prediction_id"], image, about)
        except Exception as exc:  # the client cannot buffer it: the prediction stands, its feedback is lost
            self.images_not_kept.labels(model).inc(len(images))
            self.log.warning("prediction images not kept", model=model, error=repr(exc))

    async def feedback(self, model: str, prediction_id: str, label: str) -> dict[str, Any]:
        """Store the image of an earlier prediction under its true label and tell the monitor."""
        self.state_of(model)
        try:
            validate_name(label)
        except ValueError as exc:
            raise ApiError(422, "bad_label", f"label {label!r}: {exc}") from exc
        found = await self.kept.get(prediction_id)
        if found is None:
            raise ApiError(
                404,
                "unknown_prediction",
                f"no prediction {prediction_id!r} is held: it is unknown, or older than the predictions "
                "store keeps images (CONVEYOR_INFERENCE_MAX_AGE_S, CONVEYOR_INFERENCE_MAX_BYTES)",
            )
        about, data = found.about, found.data
        if about.get("model") != model:
            raise ApiError(
                404, "unknown_prediction", f"prediction {prediction_id!r} was not made by {model!r}"
            )
        extension = next((ext for magic, ext in _EXTENSIONS.items() if data.startswith(magic)), "img")
        dataset = (await self.policies.get(model)).dataset_name
        key = f"{dataset}/{label}/feedback-{prediction_id}.{extension}"
        s = self.settings
        try:
            await asyncio.to_thread(
                self.s3.put_object,
                s.incoming_bucket,
                key,
                io.BytesIO(data),
                len(data),
                "application/octet-stream",
            )
        except Exception as exc:
            raise ApiError(
                503, "store_unavailable", f"the bucket did not take the image: {exc}", RETRY_AFTER_S
            ) from exc
        feedback = Feedback(
            prediction_id=prediction_id,
            time=datetime.now(UTC),
            version=int(about.get("version", 1)),
            predicted_label=about.get("label"),
            true_label=label,
        )
        await self.bus.publish(
            InferenceLogged(
                model=model, batch_id=f"feedback-{prediction_id}", sample_rate=1.0, feedback=[feedback]
            )
        )
        return {"stored": f"s3://{s.incoming_bucket}/{key}", "dataset": dataset, "label": label}

    def observe(self, model: str, served: tuple[int, Route] | None, status: int, seconds: float) -> None:
        """One predict request in the metrics. A name the gateway does not know counts as model "": names
        made up by clients make no series of their own."""
        named = model if model in self.catalog.states or self._known(model) else ""
        version, route = (str(served[0]), served[1]) if served else ("", "")
        self.requests.labels(named, version, route, str(status)).inc()
        self.latency.labels(named).observe(seconds)

    def _known(self, model: str) -> bool:
        try:
            validate_name(model)
        except ValueError:
            return False
        return self.catalog.known(model)

    def state_of(self, model: str) -> RolloutState:
        try:
            validate_name(model)
        except ValueError as exc:
            raise ApiError(404, "unknown_model", f"no model {model!r}: {exc}") from exc
        state = self.catalog.state(model)
        if state is None and not self.catalog.known(model):
            raise ApiError(
                404, "unknown_model", f"no model named {model!r} is deployed (GET /v1/models lists them)"
            )
        if state is None:
            raise ApiError(503, "not_deployed", f"model {model!r} has no routed version yet", RETRY_AFTER_S)
        return state

    def _spec(self, model: str, version: int) -> ServedSpec:
        try:
            return self.catalog.spec(model, version)
        except (FileNotFoundError, KeyError, ValueError) as exc:
            raise ApiError(
                503, "not_deployed", f"{model} version {version} is not deployed here yet", RETRY_AFTER_S
            ) from exc

    async def _infer(
        self, model: str, version: int, route: Route, spec: ServedSpec, batch: np.ndarray
    ) -> Answer:
        """``batch`` answered by ``version``: alone, or joined with other requests for it (``Joiner``)."""
        if batch.dtype == np.uint8 and not spec.pixels:  # a shadow version without ``pixels``: the images
            batch = normalise_pixels(batch, spec.preprocessing)
        started = time.perf_counter()
        logits, embedding = await self.joiner.infer(
            (model, version, batch.dtype.char, batch.shape[1:]),
            batch,
            self.catalog.max_batch(model),
            functools.partial(self._send, model, version, spec),
        )
        latency = (time.perf_counter() - started) * 1000
        return Answer(version, route, logits, embedding, latency)

    async def _send(
        self, model: str, version: int, spec: ServedSpec, batch: np.ndarray, *, shared: bool = True
    ) -> Rows:
        """One Triton request: ``batch`` through a shared-memory region when one is free, else as bytes."""
        g = self.grpc
        if batch.dtype == np.uint8:
            inputs = [g.InferInput(spec.pixels, list(batch.shape), "UINT8")]
        else:
            inputs = [g.InferInput(spec.input, list(batch.shape), "FP32")]
        outputs = [g.InferRequestedOutput(spec.logits), g.InferRequestedOutput(spec.embedding)]
        region = await self.shm.take(batch.nbytes) if shared else None
        if region is not None:
            region.write(batch)
            inputs[0].set_shared_memory(region.name, batch.nbytes)
        else:
            inputs[0].set_data_from_numpy(batch)
        self.triton_batch.observe(len(batch))
        try:
            result = await next(self._next).infer(
                model,
                inputs,
                model_version=str(version),
                outputs=outputs,
                client_timeout=self.settings.gateway_request_timeout_s,
            )
        except Exception as exc:  # InferenceServerException: Triton down, version unloaded, timeout
            if region is not None:
                self.shm.retire(region)  # Triton may still read it
                if "shared memory" in str(exc).lower():  # Triton restarted and forgot it: once more, as bytes
                    await self.shm.forget()
                    return await self._send(model, version, spec, batch, shared=False)
            raise ApiError(
                503,
                "triton_unavailable",
                f"Triton could not answer for {model} version {version}: {exc}",
                RETRY_AFTER_S,
            ) from exc
        except BaseException:  # cancelled (the request's timeout): Triton may still read the region
            if region is not None:
                self.shm.retire(region)
            raise
        if region is not None:
            self.shm.give(region)
        return result.as_numpy(spec.logits), result.as_numpy(spec.embedding)

    # ---- shadow and logging ------------------------------------------------------------------------------

    async def _shadow_worker(self) -> None:
        while True:
            model, batch, answer, samples = await self.shadow_queue.get()
            try:
                await self._shadow_one(model, batch, answer, samples)
            except Exception as exc:  # a mirror never fails anything but itself
                self.shadow_failed.labels(model).inc()
                self.log.warning("shadow request failed", model=model, error=repr(exc))
                self._log(model, samples)

    async def _shadow_one(
        self, model: str, batch: np.ndarray, answer: Answer, samples: list[InferenceSample]
    ) -> None:
        state = self.catalog.state(model)
        shadow = mirror(state, answer.version) if state else None
        if shadow is None:
            self._log(model, samples)
            return
        spec = self.catalog.spec(model, shadow)
        result = await self._infer(model, shadow, "active", spec, batch)
        theirs = _softmax(result.logits)
        ours = answer.logits.argmax(axis=1)
        for i, label_index in enumerate(theirs.argmax(axis=1)):
            agrees = int(label_index) == int(ours[i])
            self.shadow_compared.labels(model, str(agrees).lower()).inc()
            if i < len(samples):  # samples exist only for a sampled request
                compared = ShadowResult.model_construct(
                    version=shadow,
                    label=spec.labels[int(label_index)],
                    confidence=float(theirs[i, label_index]),
                    agrees=agrees,
                    latency_ms=result.latency_ms,
                )
                samples[i] = samples[i].model_copy(update={"shadow": compared})
        self._log(model, samples)

    def _samples(
        self, stats: list[ImageStats], answer: Answer, predictions: list[dict[str, Any]]
    ) -> list[InferenceSample]:
        now = datetime.now(UTC)
        return [
            InferenceSample.model_construct(
                prediction_id=predictions[i]["prediction_id"],
                time=now,
                version=answer.version,
                route=answer.route,
                latency_ms=answer.latency_ms,
                ok=True,
                error=None,
                label=predictions[i]["label"],
                confidence=predictions[i]["confidence"],
                image_stats=stats[i],
                embedding=answer.embedding[i].tolist() if answer.embedding is not None else None,
                shadow=None,
            )
            for i in range(len(predictions))
        ]

    def _log(self, model: str, samples: list[InferenceSample]) -> None:
        for sample in samples:
            self.inference_log.log(model, sample)

    async def describe(self, model: str) -> dict[str, Any]:
        """What a client of ``model`` may rely on (KServe's model metadata, in the gateway's terms): each
        version a route names, with its routes, its readiness in Triton, its labels and the input it takes."""
        try:
            state: RolloutState | None = self.state_of(model)
        except ApiError as exc:
            if exc.status != 503:  # unknown: 404; known but routed nowhere yet: described as such
                raise
            state = None
        routes: dict[int, list[str]] = {}
        if state is not None:
            named = ("active", state.active_version), ("canary", state.canary_version)
            for route, version in (*named, ("shadow", state.shadow_version)):
                if version is not None:
                    routes.setdefault(version, []).append(route)
        versions = []
        for version, names in sorted(routes.items()):
            entry: dict[str, Any] = {
                "version": version,
                "routes": names,
                "ready": await self._version_ready(model, version),
            }
            try:
                spec = self.catalog.spec(model, version)
            except (FileNotFoundError, KeyError, ValueError):
                entry["deployed"] = False  # serving has not written it here (yet)
            else:
                entry |= {
                    "deployed": True,
                    "labels": list(spec.labels),
                    "input": spec.preprocessing.to_dict(),
                }
            versions.append(entry)
        return {
            "model": model,
            "rollout": state.model_dump(mode="json") if state is not None else None,
            "versions": versions,
            "image_formats": ["png", "jpeg", "tiff"],
            "max_images": self.settings.gateway_max_images,
            "max_body_bytes": self.settings.gateway_max_body_bytes,
        }

    async def _version_ready(self, model: str, version: int) -> bool:
        """Triton calls the version ready; False when it says otherwise or does not answer within the
        request timeout (a stuck Triton must not hang ``/readyz``)."""
        timeout = self.settings.gateway_request_timeout_s
        try:
            return bool(await self._clients[0].is_model_ready(model, str(version), client_timeout=timeout))
        except Exception:
            return False

    async def ready(self) -> bool:
        """Every version a route needs answers ready in Triton (model readiness: server readiness flickers
        while a model unloads)."""
        for model, state in list(self.catalog.states.items()):
            for version in (state.active_version, state.canary_version):
                if version is not None and not await self._version_ready(model, version):
                    return False
        return True


def _failed(
    count: int, version: int, route: Route, started: float, error: str, stats: list[ImageStats]
) -> list[InferenceSample]:
    now, latency = datetime.now(UTC), (time.perf_counter() - started) * 1000
    return [
        InferenceSample.model_construct(
            prediction_id=uuid.uuid4().hex,
            time=now,
            version=version,
            route=route,
            latency_ms=latency,
            ok=False,
            error=error,
            label=None,
            confidence=None,
            image_stats=stats[i] if i < len(stats) else None,
            embedding=None,
            shadow=None,
        )
        for i in range(count)
    ]


def _prepare_all(
    images: list[bytes], spec: ServedSpec, keep_prepared: bool
) -> tuple[np.ndarray, list[np.ndarray]]:
    """The model's input batch, decoding each image once: N x C x S x S uint8 samples when the version takes
    ``pixels`` and every image is 8-bit and already S x S x C (``prepare`` would only scale it), else float32
    images. For a sampled request also what the statistics are taken of: ``prepare``'s output of each (or the
    samples, which ``image_stats`` scales the same way), as the trainer took the reference profile's.

    Only images of the model's size are held while the request may still go as pixels: the first one that
    needs more turns those into images, and each later image is prepared as it is decoded (a batch of large
    photos never holds more than one of them decoded)."""
    pre = spec.preprocessing
    shape = (pre.size, pre.size, pre.channels)
    samples: list[np.ndarray] = []  # while every image so far can go as pixels
    batch: np.ndarray | None = None  # float32 images, from the first image that cannot
    kept: list[np.ndarray] = []

    def add(row: int, decoded: np.ndarray) -> None:
        assert batch is not None
        prepared = prepare(decoded, pre)  # scales the samples as decode would have
        normalise(prepared, pre, out=batch[row])
        if keep_prepared:
            kept.append(prepared)

    for index, image in enumerate(images):
        try:
            decoded = decode_samples(image, pages=pages_for(pre))
        except ImageDecodeError as exc:
            raise type(exc)(f"image {index}: {exc}") from exc
        if batch is None and spec.pixels and decoded.dtype == np.uint8 and decoded.shape == shape:
            samples.append(decoded)
            continue
        if batch is None:
            batch = np.empty((len(images), pre.channels, pre.size, pre.size), dtype=np.float32)
            for row, earlier in enumerate(samples):
                add(row, earlier)
        add(index, decoded)
    if batch is not None:
        return batch, kept
    pixels = np.empty((len(images), pre.channels, pre.size, pre.size), dtype=np.uint8)
    for row, decoded in zip(pixels, samples, strict=True):
        row[...] = decoded.transpose(2, 0, 1)
    return pixels, samples if keep_prepared else []


def _stats(prepared: list[np.ndarray]) -> list[ImageStats]:
    stats = []
    for image in prepared:
        st = image_stats(image)
        stats.append(
            ImageStats.model_construct(
                mean=st["mean"], std=st["std"], contrast=st["contrast"], sharpness=st["sharpness"]
            )
        )
    return stats


def _softmax(logits: np.ndarray) -> np.ndarray:
    # the ufuncs' reduce, not .max()/.sum(): their Python wrappers cost more than a 1 x 10 softmax itself
    exp = np.exp(logits - np.maximum.reduce(logits, axis=1, keepdims=True), dtype=np.float64)
    exp /= np.add.reduce(exp, axis=1, keepdims=True)
    return exp


# ---- HTTP ------------------------------------------------------------------------------------------------


async def read_images(request: Request, limit: int, max_images: int) -> list[bytes]:
    """The images of a predict request, whatever the encoding; ``ApiError`` for a body that is not one."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, "too_large", f"the body is {int(declared):,} bytes, over the limit of {limit:,}")
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind == "multipart/form-data":
        try:
            form = await request.form(max_files=max_images, max_part_size=limit)
        except HTTPException as exc:  # Starlette refuses the multipart body; its limits by their message
            detail = str(exc.detail)
            if detail.startswith("Too many files"):
                raise ApiError(413, "too_many_images", f"over {max_images} images per request") from exc
            if "exceeded maximum size" in detail:
                raise ApiError(413, "too_large", f"a file is over the limit of {limit:,} bytes") from exc
            raise ApiError(400, "bad_multipart", f"the multipart body cannot be read: {detail}") from exc
        files = [v for _, v in form.multi_items() if isinstance(v, UploadFile)]
        images = [await f.read() for f in files]
        if sum(map(len, images)) > limit:
            raise ApiError(413, "too_large", f"the files add up to more than {limit:,} bytes")
    else:
        body = await read_body(request, limit)
        if kind.startswith("image/") or kind == "application/octet-stream":
            images = [body]
        elif kind == "application/json":
            images = _json_images(body)
        else:
            raise ApiError(
                415,
                "unsupported_media_type",
                f"content type {kind or 'none'!r}: send multipart/form-data files, image/* or "
                'application/octet-stream bytes, or JSON {"image": base64} / {"images": [base64, ...]}',
            )
    if not images:
        raise ApiError(422, "no_image", "the request holds no image")
    if len(images) > max_images:
        raise ApiError(
            413, "too_many_images", f"{len(images)} images, over the limit of {max_images} per request"
        )
    return images


async def read_body(request: Request, limit: int) -> bytes:
    """The request's body, refused with a 413 as soon as it passes ``limit`` bytes."""
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ApiError(413, "too_large", f"the body is over the limit of {limit:,} bytes")
    return bytes(body)


def _json_images(body: bytes) -> list[bytes]:
    try:
        doc = json.loads(body)
    except ValueError as exc:
        raise ApiError(422, "bad_json", f"the body is not JSON: {exc}") from exc
    items: Any = None
    if isinstance(doc, dict):
        items = [doc["image"]] if "image" in doc else doc.get("images")
    if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
        raise ApiError(422, "bad_json", 'send {"image": "<base64>"} or {"images": ["<base64>", ...]}')
    try:
        return [base64.b64decode(item, validate=True) for item in items]
    except (binascii.Error, ValueError) as exc:
        raise ApiError(422, "bad_base64", f"an image is not valid base64: {exc}") from exc


def create_app(settings: GatewaySettings | None = None) -> FastAPI:
    """The gateway app of one worker (``uvicorn --factory services.serving.gateway.app:create_app``)."""
    s = settings or GatewaySettings()
    setup_logging(s)  # each worker is a process of its own, which ``__main__`` did not set up
    gateway = Gateway(s)
    keys = [k.get_secret_value().encode() for k in s.gateway_api_keys]

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await gateway.start()
        try:
            yield
        finally:
            await gateway.stop()

    app = GatewayApp(
        title="Conveyor gateway",
        description=__doc__,
        lifespan=lifespan,
        docs_url="/docs",
        openapi_url="/openapi.json",
    )
    app.state.gateway = gateway

    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, exc: HTTPException) -> JSONResponse:  # no such path, or method
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "error")
        return JSONResponse({"error": code, "detail": exc.detail}, exc.status_code, headers=exc.headers)

    def authorize(request: Request) -> None:
        if not keys:
            return
        given = request.headers.get("x-api-key") or request.headers.get("authorization", "").removeprefix(
            "Bearer "
        )
        if not any(hmac.compare_digest(given.encode(), key) for key in keys):
            raise ApiError(
                401, "unauthorized", "send an API key as `X-API-Key: <key>` (CONVEYOR_GATEWAY_API_KEYS)"
            )

    tracer = gateway.bus.tracer_provider.get_tracer("conveyor.gateway")

    @app.post("/v1/models/{model}/predict", responses={200: PREDICT_RESPONSE})
    async def predict(model: str, request: Request) -> Response:
        """Classify one image or a batch; see the module docs for the encodings."""
        started = time.perf_counter()
        served: tuple[int, Route] | None = None
        try:
            authorize(request)
            policy = gateway.catalog.sampling(model)
            rate = policy.trace_sample_rate if policy else s.gateway_trace_sample_rate
            if random.random() < rate:  # the model's policy (sampling.trace_sample_rate), else the gateway's
                with tracer.start_as_current_span(
                    f"predict {model}", attributes={"conveyor.model": model}
                ) as span:
                    answer = await _predict(model, request)
                    span.set_attributes(
                        {"conveyor.version": answer["version"], "conveyor.route": answer["route"]}
                    )
            else:
                answer = await _predict(model, request)
            served = answer["version"], answer["route"]
            # orjson straight to bytes: FastAPI's own encoding of a returned dict walks it first (≈55 µs)
            response = Response(orjson.dumps(answer), media_type="application/json")
        except ApiError as exc:
            served, response = exc.served, error_response(exc)
        except Exception as exc:  # what FastAPI's error middleware would answer, in the gateway's form
            gateway.log.exception("predict failed", model=model)
            response = error_response(ApiError(500, "internal", f"the gateway failed: {exc!r}"))
        gateway.observe(model, served, response.status_code, time.perf_counter() - started)
        return response

    app.predict_endpoint = predict

    async def _predict(model: str, request: Request) -> dict[str, Any]:
        deadline = asyncio.get_running_loop().time() + s.gateway_request_timeout_s
        async with timeout_504(deadline):
            gateway.state_of(model)  # an unknown model is a 404 whatever the body
            images = await read_images(request, s.gateway_max_body_bytes, s.gateway_max_images)
        return await gateway.predict(model, images, request.headers.get("x-request-key"), deadline)

    @asynccontextmanager
    async def timeout_504(deadline: float | None = None) -> AsyncIterator[None]:
        """The request's timeout (``CONVEYOR_GATEWAY_REQUEST_TIMEOUT_S`` from now, or until ``deadline``),
        answered as a 504."""
        if deadline is None:
            deadline = asyncio.get_running_loop().time() + s.gateway_request_timeout_s
        try:
            async with asyncio.timeout_at(deadline):
                yield
        except TimeoutError as exc:
            raise timed_out(s.gateway_request_timeout_s) from exc

    @app.post("/v1/models/{model}/feedback", status_code=202)
    async def feedback(model: str, request: Request) -> dict[str, Any]:
        """The true label of an earlier prediction: new labelled data, and live accuracy for the monitor."""
        authorize(request)
        async with timeout_504():
            body = await read_body(request, FEEDBACK_MAX_BYTES)
            try:
                doc = json.loads(body)
            except ValueError as exc:
                raise ApiError(422, "bad_json", f"the body is not JSON: {exc}") from exc
            if (
                not isinstance(doc, dict)
                or not isinstance(doc.get("prediction_id"), str)
                or not isinstance(doc.get("label"), str)
            ):
                raise ApiError(
                    422,
                    "bad_feedback",
                    'send {"prediction_id": "<id from predict>", "label": "<true label>"}',
                )
            return await gateway.feedback(model, doc["prediction_id"], doc["label"])

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        catalog = gateway.catalog
        return {
            "models": {m: st.model_dump(mode="json") for m, st in sorted(catalog.states.items())},
            "sampling": {m: p.sampling.model_dump() for m, p in sorted(catalog.policies.values.items())},
        }

    @app.get("/v1/models/{model}")
    async def describe(model: str) -> dict[str, Any]:
        """One model: its rollout state and each routed version's routes, readiness, labels and input."""
        return await gateway.describe(model)

    @app.get("/healthz")
    async def healthz() -> Response:
        return Response(b"ok", 200)

    @app.get("/readyz")
    async def readyz() -> Response:
        ok = await gateway.ready()
        return Response(b"ready" if ok else b"not ready", 200 if ok else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        """Every worker's counts: with PROMETHEUS_MULTIPROC_DIR (set by ``__main__``), summed across them."""
        registry = gateway.metrics
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            from prometheus_client import multiprocess

            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
        return Response(generate_latest(registry), media_type="text/plain; version=0.0.4")

    return app
