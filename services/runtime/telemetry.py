"""Traces (OpenTelemetry, carried across NATS hops in W3C ``traceparent`` headers) and JSON logs (structlog).

Every log line carries ``service``, and inside a traced handler ``trace_id``, ``span_id`` and ``event_id``,
so a log line leads to its trace and its event.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import MutableMapping
from contextvars import ContextVar
from types import TracebackType
from typing import Any

import structlog
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ParentBased, TraceIdRatioBased

from services.runtime.config import Settings

__all__ = ["current_event_id", "get_logger", "setup_logging", "setup_tracing"]

current_event_id: ContextVar[str | None] = ContextVar("conveyor_event_id", default=None)


def setup_tracing(settings: Settings, *processors: SpanProcessor) -> TracerProvider:
    """A tracer provider for this service: OTLP/HTTP export when ``CONVEYOR_OTLP_ENDPOINT`` is set.

    Extra span processors (tests pass an in-memory exporter) are added too. With nothing to export to,
    spans are not recorded (no cost), but trace ids still flow through NATS headers and into the logs. The
    provider is returned rather than installed globally, so two services in one test process keep their
    own ``service.name``.
    """
    exporting = bool(settings.otlp_endpoint or processors)
    sampler = ParentBased(TraceIdRatioBased(settings.trace_sample_rate)) if exporting else ALWAYS_OFF
    provider = TracerProvider(resource=Resource.create({"service.name": settings.service}), sampler=sampler)
    if settings.otlp_endpoint:
        # Imported here: the exporter pulls in protobuf, which a process without export need not load.
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter(endpoint=settings.otlp_endpoint, headers=settings.otlp_headers or None)
        provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=1000))
    for processor in processors:
        provider.add_span_processor(processor)
    return provider


def _add_trace_context(_: Any, __: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    ctx = trace.get_current_span().get_span_context()
    if ctx.is_valid:
        event_dict.setdefault("trace_id", format(ctx.trace_id, "032x"))
        event_dict.setdefault("span_id", format(ctx.span_id, "016x"))
    event_id = current_event_id.get()
    if event_id:
        event_dict.setdefault("event_id", event_id)
    return event_dict


# Libraries whose INFO is a line per HTTP call (serving's requests to Triton) or per SQL statement (what
# MLflow quietens itself when it configures logging): their warnings still show.
CHATTY_LOGGERS = ("httpx", "httpcore", "urllib3", "sqlalchemy.engine", "alembic")
# MLflow's own output that is not a log record: a progress bar per artifact download, and a run's URL printed
# to stdout when it ends (the trainer's ``trained`` line names the run instead).
MLFLOW_QUIET = {
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
}


def setup_logging(settings: Settings) -> None:
    """JSON lines on stdout (the supervisor writes them to the service's rotated log file), the records of
    the libraries' own loggers (MLflow, nats, faststream, httpx) included: they get the same keys, plus
    ``logger``."""
    level = logging.getLevelNamesMapping().get(settings.log_level.upper(), logging.INFO)
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _add_trace_context,
    ]
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                structlog.processors.JSONRenderer(),
            ],
        )
    )
    logging.basicConfig(handlers=[handler], level=level, force=True)
    logging.captureWarnings(True)  # a library's warnings too, as records of ``py.warnings``
    sys.excepthook = _log_crash  # the traceback of a service that dies, as its last JSON line
    for name in CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(max(level, logging.WARNING))
    # MLflow gives its loggers a text handler of their own when it is imported, unless told not to; where it
    # is imported already, its handler goes and its records come to the JSON handler above
    os.environ.setdefault("MLFLOW_CONFIGURE_LOGGING", "false")
    for name, value in MLFLOW_QUIET.items():
        os.environ.setdefault(name, value)
    mlflow_logger = logging.getLogger("mlflow")
    if os.environ["MLFLOW_CONFIGURE_LOGGING"].lower() in ("false", "0"):
        mlflow_logger.handlers, mlflow_logger.propagate = [], True
    structlog.configure(  # through the one handler, so that lines from two threads never interleave
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.stdlib.LoggerFactory(),
        cache_logger_on_first_use=True,
    )
    structlog.contextvars.bind_contextvars(service=settings.service)


def _log_crash(kind: type[BaseException], value: BaseException, tb: TracebackType | None) -> None:
    if issubclass(kind, KeyboardInterrupt):
        sys.__excepthook__(kind, value, tb)
        return
    logging.getLogger("conveyor").critical("crashed", exc_info=(kind, value, tb))


def get_logger(**bound: Any) -> Any:
    return structlog.get_logger("conveyor").bind(**bound)
