"""A minimal flask-sse app: the Python peer that tests/perf/compare.py measures rtchat against.

Run it the way flask-sse's documentation recommends, under gunicorn with
gevent workers, with a Redis for its pub/sub::

    pip install flask-sse gunicorn gevent
    SSE_REDIS_URL=redis://127.0.0.1:PORT \\
        gunicorn -k gevent -w 5 -b 127.0.0.1:8000 tests.perf.flask_sse_app:app

Routes, shaped like rtchat's so ``rtchat bench`` needs only ``--sub-url``:

- ``GET /stream?channel=ROOM``: flask-sse's own stream view, one Redis
  subscription per client;
- ``POST /rooms/ROOM/messages`` with JSON ``{"nick", "text"}``: ``sse.publish``
  on channel ROOM, ``201 {"subscribers": n}``;
- ``GET /healthz``: 200 once the app serves.

Not part of rtchat, never imported by it or by the unit tests.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator

from flask import Flask, jsonify, request
from flask_sse import sse

app = Flask(__name__)
app.config["SSE_REDIS_URL"] = os.environ.get("SSE_REDIS_URL", "redis://127.0.0.1:6380/0")


def _opened(body: Iterable[str]) -> Iterator[str]:
    """flask-sse's stream, preceded by a comment.

    flask-sse yields nothing until the first event, so gunicorn would send no
    response headers before then; an EventSource client (and the bench) waits
    for them. The comment opens the stream at once; ``yield from`` passes the
    client's disconnect on to flask-sse's generator, which unsubscribes.
    """
    yield ": open\n\n"
    yield from body


@app.route("/stream")
def stream():  # type: ignore[no-untyped-def]
    response = sse.stream()
    response.response = _opened(response.response)
    return response


@app.route("/rooms/<room>/messages", methods=["POST"])
def post_message(room: str):  # type: ignore[no-untyped-def]
    payload = request.get_json(silent=True) or {}
    text = payload.get("text")
    if not isinstance(text, str) or not text:
        return jsonify(error="missing_text"), 400
    nick = payload.get("nick") or "anonymous"
    receivers = sse.publish({"nick": nick, "text": text}, type="message", channel=room)
    return jsonify(subscribers=receivers), 201


@app.route("/healthz")
def healthz():  # type: ignore[no-untyped-def]
    return jsonify(status="ok")
