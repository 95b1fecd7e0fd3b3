"""Server-Sent Events framing as pure functions returning bytes.

Owns the wire format of ``text/event-stream`` and nothing else: no sockets,
no queues. Every function here is tested byte for byte.
"""

from __future__ import annotations

import json
import random

# Comments and the retry field are written as lines that end no event block: a blank
# line after them would be a data-less block, which httpx-sse and sseclient-py hand to
# their users as an empty "message" event. The next real event's blank line ends them.
PING = b": ping\n"
# The response headers of every event stream: no caching, and no proxy buffering.
HEADERS = (
    ("Content-Type", "text/event-stream; charset=utf-8"),
    ("Cache-Control", "no-cache"),
    ("X-Accel-Buffering", "no"),
)


def event(data: str, event: str | None = None, id: str | None = None) -> bytes:
    """One event block. Multi-line ``data`` becomes one ``data:`` line per line."""
    lines = []
    if id is not None:
        _check_field(id)
        lines.append(f"id: {id}")
    if event is not None:
        _check_field(event)
        lines.append(f"event: {event}")
    for line in data.replace("\r\n", "\n").replace("\r", "\n").split("\n"):
        lines.append(f"data: {line}")
    return ("\n".join(lines) + "\n\n").encode("utf-8")


def comment(text: str = "") -> bytes:
    """A comment line: ignored by EventSource, keeps proxies from timing the stream out."""
    _check_field(text)
    return f": {text}\n".encode() if text else b":\n"


def retry(ms: int) -> bytes:
    """The reconnection delay, as a line of its own (applied by clients as it is read)."""
    return f"retry: {int(ms)}\n".encode()


def jittered_retry(base_ms: int, rng: random.Random | None = None) -> int:
    """``base_ms`` with +-50% jitter, so a dropped node's clients do not return at once."""
    r = rng or random
    return max(1, round(base_ms * r.uniform(0.5, 1.5)))


def message(message_id: str, json_data: str) -> bytes:
    """A chat message frame: ``id``, ``event: message``, one ``data:`` line of JSON."""
    return f"id: {message_id}\nevent: message\ndata: {json_data}\n\n".encode()


def json_event(name: str, payload: object, id: str | None = None) -> bytes:
    """A named event carrying JSON (``presence``, ``reset``), with an id only when given."""
    return event(json.dumps(payload, ensure_ascii=False, separators=(",", ":")), event=name, id=id)


def _check_field(value: str) -> None:
    if "\n" in value or "\r" in value:
        raise ValueError("SSE field values cannot contain line breaks")
