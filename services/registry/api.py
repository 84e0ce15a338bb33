"""The registry's admin API: the same promote, rollback and route the registry does itself, by hand.

Every request needs ``Authorization: Bearer <CONVEYOR_ADMIN_TOKEN>``; ``X-Conveyor-User`` names the person
(the audit actor becomes ``admin:<user>``) and ``X-Request-Id`` makes a retried request idempotent.

==========================================  ====================================================
``GET  /v1/models``                         the registered models
``GET  /v1/models/{model}``                 versions, aliases, state tags, metrics, rollout state
``GET  /v1/models/{model}/audit?limit=N``   the audit log, oldest first
``POST /v1/models/{model}/promote``         ``{"version": 3, "to": "staging", "reason": "..."}``
``POST /v1/models/{model}/rollback``        ``{"stage": "champion", "reason": "..."}`` (or ``canary``)
``POST /v1/models/{model}/route``           ``{"kind": "canary", "version": 3, "weight": 20, "reason": ...}``
==========================================  ====================================================

A change answers 200 with ``{"changed": true, "transition": <audit seq>, "entry": ..., "rollout": ...}``, or
``{"changed": false}`` when the model is already in that state. An illegal change answers with the status of
its code (``stages.HTTP_STATUS``) and ``{"error": code, "detail": "what is wrong and what to do"}``.
"""

from __future__ import annotations

import hmac
import uuid
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, Header, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from contracts.envelope import Event
from contracts.kv import Stage
from contracts.names import Name
from services.registry.registrar import Committed, Registrar
from services.registry.rollout import RouteKind
from services.registry.stages import IllegalTransition

__all__ = ["PromoteRequest", "RollbackRequest", "RouteRequest", "admin_api"]


class PromoteRequest(BaseModel):
    version: int = Field(ge=1)
    to: Stage
    reason: str = Field(min_length=1, description="why, for the audit log")


class RollbackRequest(BaseModel):
    stage: Literal["champion", "canary"] = "champion"
    reason: str = Field(min_length=1)


class RouteRequest(BaseModel):
    kind: RouteKind = Field(description="blue_green, canary, shadow or clear")
    version: int | None = Field(None, ge=1)
    weight: int | None = Field(None, ge=1, le=100, description="canary percent")
    reason: str = Field(min_length=1)


def _actor(
    request: Request,
    authorization: Annotated[str | None, Header()] = None,
    x_conveyor_user: Annotated[str | None, Header()] = None,
) -> str:
    """The audit actor of an authorized request (``admin:<user>``); 401 without the admin token."""
    token: str = request.app.state.token
    scheme, _, given = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.encode(), token.encode()):
        raise HTTPException(
            401,
            detail="send the admin token as `Authorization: Bearer <token>` (CONVEYOR_ADMIN_TOKEN; "
            "the embedded stack keeps it in .conveyor/secrets.json)",
        )
    return f"admin:{(x_conveyor_user or '').strip()[:64] or 'admin'}"


def _request_id(x_request_id: Annotated[str | None, Header()] = None) -> str:
    return f"admin-{x_request_id or uuid.uuid4().hex}"


Actor = Annotated[str, Depends(_actor)]
RequestId = Annotated[str, Depends(_request_id)]


def admin_api(registrar: Registrar, publish: Callable[[Event], Awaitable[Any]], token: str) -> FastAPI:
    api = FastAPI(
        title="Conveyor registry admin API",
        description=__doc__,
        docs_url="/v1/docs",
        openapi_url="/v1/openapi.json",
    )
    api.state.token = token

    @api.exception_handler(IllegalTransition)
    async def illegal(_: Request, exc: IllegalTransition) -> JSONResponse:
        return JSONResponse({"error": exc.code, "detail": exc.message}, status_code=exc.http_status)

    @api.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {401: "unauthorized", 404: "not_found", 405: "method_not_allowed"}.get(
            exc.status_code, "error"
        )
        return JSONResponse({"error": code, "detail": exc.detail}, exc.status_code, headers=exc.headers)

    @api.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        problems = [
            f"{'.'.join(str(p) for p in e['loc'] if p != 'body') or 'body'}: {e['msg']}" for e in exc.errors()
        ]
        return JSONResponse({"error": "bad_input", "detail": "; ".join(problems)}, status_code=422)

    async def answer(done: Committed | None) -> dict[str, Any]:
        if done is None:
            return {"changed": False}
        for event in done.events:
            await publish(event)
        return {
            "changed": True,
            "transition": done.seq,
            "entry": done.entry.model_dump(mode="json"),
            "rollout": done.rollout.model_dump(mode="json") if done.rollout else None,
            "events": [event.type for event in done.events],
        }

    @api.get("/v1/models")
    async def models(_: Actor) -> dict[str, Any]:
        return {"models": await registrar.models()}

    @api.get("/v1/models/{model}")
    async def describe(model: Name, _: Actor) -> dict[str, Any]:
        return await registrar.describe(model)

    @api.get("/v1/models/{model}/audit")
    async def audit(
        model: Name, _: Actor, limit: Annotated[int | None, Query(ge=1, le=10_000)] = None
    ) -> dict[str, Any]:
        entries = await registrar.audit.history(model, limit=limit)
        if not entries:
            await registrar.describe(model)  # 404 for a model that does not exist
        return {"model": model, "entries": [{"seq": s, **e.model_dump(mode="json")} for s, e in entries]}

    @api.post("/v1/models/{model}/promote")
    async def promote(model: Name, body: PromoteRequest, who: Actor, rid: RequestId) -> dict[str, Any]:
        done = await registrar.promote(
            model, body.version, body.to, reason=body.reason, actor=who, request_id=rid
        )
        return await answer(done)

    @api.post("/v1/models/{model}/rollback")
    async def rollback(model: Name, body: RollbackRequest, who: Actor, rid: RequestId) -> dict[str, Any]:
        done = await registrar.rollback(
            model, stage=body.stage, reason=body.reason, actor=who, request_id=rid
        )
        return await answer(done)

    @api.post("/v1/models/{model}/route")
    async def route(model: Name, body: RouteRequest, who: Actor, rid: RequestId) -> dict[str, Any]:
        done = await registrar.route(
            model, body.kind, body.version, body.weight, reason=body.reason, actor=who, request_id=rid
        )
        return await answer(done)

    return api
