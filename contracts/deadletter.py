"""The dead-letter record: what a service could not handle, and why (subject ``<prefix>.dlq.<service>``).

The original message travels inside it unchanged, so ``conveyor dlq replay`` can send it back.
"""

from __future__ import annotations

import base64
from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["DeadLetter"]


class DeadLetter(BaseModel):
    """A message a consumer gave up on, with the reason; published by the consumer's service."""

    model_config = ConfigDict(extra="ignore")

    service: str
    consumer: str = Field(description="the durable consumer that gave up")
    reason: str = Field(description="what went wrong, in words an operator can act on")
    kind: Literal["invalid", "permanent", "transient", "exhausted"] = Field(
        description="invalid: bad JSON or schema; permanent: can never succeed; transient/exhausted: "
        "kept failing for max_deliveries deliveries"
    )
    subject: str = Field(description="where the original message was published")
    stream: str
    stream_seq: int
    num_delivered: int
    failed_at: datetime
    event_id: str | None = None
    headers: dict[str, str] = Field(default_factory=dict)
    payload: str = Field(description="the original message body (base64 when not UTF-8)")
    payload_encoding: Literal["utf-8", "base64"] = "utf-8"

    @classmethod
    def wrap_payload(cls, data: bytes) -> tuple[str, Literal["utf-8", "base64"]]:
        try:
            return data.decode("utf-8"), "utf-8"
        except UnicodeDecodeError:
            return base64.b64encode(data).decode(), "base64"

    def original_payload(self) -> bytes:
        if self.payload_encoding == "base64":
            return base64.b64decode(self.payload)
        return self.payload.encode()
