"""``GatewayApp``'s dispatch, without Triton or NATS: predict goes straight to its endpoint, everything else
through FastAPI (its middleware included), and the OpenAPI document still lists predict."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from fastapi import Request, Response
from starlette.middleware.base import BaseHTTPMiddleware

from services.serving.gateway.app import GatewayApp

pytestmark = pytest.mark.unit


def make_app() -> tuple[GatewayApp, list[str], list[str]]:
    app = GatewayApp()
    through_middleware: list[str] = []
    predicted: list[str] = []

    async def record(request: Request, call_next: Any) -> Any:
        through_middleware.append(request.url.path)
        return await call_next(request)

    app.add_middleware(BaseHTTPMiddleware, dispatch=record)

    @app.post("/v1/models/{model}/predict")
    async def predict(model: str, request: Request) -> Response:
        predicted.append(f"{model}:{(await request.body()).decode()}")
        return Response(b'{"ok": true}', media_type="application/json")

    @app.get("/v1/models")
    async def models() -> dict[str, list[str]]:
        return {"models": []}

    app.predict_endpoint = predict
    return app, through_middleware, predicted


async def test_predict_skips_the_stack_and_the_rest_goes_through_it():
    app, through_middleware, predicted = make_app()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as http:
        answer = await http.post("/v1/models/digits/predict", content=b"png-bytes")
        assert answer.status_code == 200 and answer.json() == {"ok": True}
        assert predicted == ["digits:png-bytes"] and through_middleware == []

        assert (await http.get("/v1/models")).status_code == 200
        wrong_method = await http.get("/v1/models/digits/predict")  # not predict: FastAPI answers
        nested = await http.post("/v1/models/a/b/predict", content=b"x")  # {model} holds no slash
        assert (wrong_method.status_code, nested.status_code) == (405, 404)
        assert through_middleware == ["/v1/models", "/v1/models/digits/predict", "/v1/models/a/b/predict"]
        assert predicted == ["digits:png-bytes"]

        documented = (await http.get("/openapi.json")).json()["paths"]
        assert "post" in documented["/v1/models/{model}/predict"]


async def test_without_an_endpoint_predict_goes_through_fastapi():
    app, through_middleware, predicted = make_app()
    app.predict_endpoint = None
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as http:
        answer = await http.post("/v1/models/digits/predict", content=b"png")
    assert answer.status_code == 200 and predicted == ["digits:png"]
    assert through_middleware == ["/v1/models/digits/predict"]
