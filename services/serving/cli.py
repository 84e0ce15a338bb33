"""Serving's CLI command: ``conveyor predict MODEL IMAGE...`` through the gateway, as a client would."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import httpx
import typer
from rich.console import Console
from rich.table import Table

from contracts.names import validate_name
from services.runtime.config import Settings

__all__ = ["predict_command", "predict_files"]

console = Console()
err = Console(stderr=True)


def predict_files(
    gateway_url: str, model: str, paths: list[Path], *, api_key: str | None = None, key: str | None = None
) -> httpx.Response:
    """One predict request with ``paths`` as multipart files."""
    headers = {}
    if api_key:
        headers["X-API-Key"] = api_key
    if key:
        headers["X-Request-Key"] = key
    files = [("files", (p.name, p.read_bytes(), "application/octet-stream")) for p in paths]
    with httpx.Client(base_url=gateway_url.rstrip("/"), timeout=60) as client:
        return client.post(f"/v1/models/{model}/predict", files=files, headers=headers)


def predict_command(settings_factory: Callable[[], Settings]) -> Callable[..., None]:
    def predict(
        model: str = typer.Argument(..., help="the model, e.g. digits"),
        images: list[Path] = typer.Argument(
            ..., help="image files (PNG, JPEG, TIFF)", exists=True, dir_okay=False
        ),
        api_key: str = typer.Option(None, envvar="CONVEYOR_GATEWAY_API_KEY", help="the gateway's API key"),
        request_key: str = typer.Option(
            None, "--key", help="X-Request-Key: the same key sees the same version"
        ),
        as_json: bool = typer.Option(False, "--json", help="print the gateway's JSON answer"),
    ) -> None:
        """Classify images through the gateway (CONVEYOR_GATEWAY_URL), as a client of the model would."""
        try:
            validate_name(model)
        except ValueError as exc:
            err.print(f"[red]{exc}[/]")
            raise typer.Exit(2) from exc
        settings = settings_factory()
        try:
            response = predict_files(settings.gateway_url, model, images, api_key=api_key, key=request_key)
        except httpx.HTTPError as exc:
            err.print(f"[red]cannot reach the gateway at {settings.gateway_url}[/]: {exc}. Is the stack up?")
            raise typer.Exit(1) from exc
        if response.status_code != 200:
            try:
                doc = response.json()
            except ValueError:
                doc = {"error": f"http_{response.status_code}", "detail": response.text}
            err.print(f"[red]{doc.get('error')}[/]: {doc.get('detail')}")
            if response.headers.get("retry-after"):
                err.print(f"try again in {response.headers['retry-after']} s")
            raise typer.Exit(1)
        doc = response.json()
        if as_json:
            print(json.dumps(doc, indent=2))
            return
        table = Table(title=f"{model}@{doc['version']} ({doc['route']})")
        for column in ("image", "label", "confidence", "prediction id"):
            table.add_column(column)
        for path, p in zip(images, doc["predictions"], strict=True):
            table.add_row(path.name, p["label"], f"{p['confidence']:.3f}", p["prediction_id"])
        console.print(table)

    return predict
