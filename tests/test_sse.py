"""SSE framing, byte for byte."""

import random

import pytest

from rtchat import sse
from rtchat.messages import Message


def test_message_frame_is_id_event_and_one_data_line() -> None:
    msg = Message(id="1700000000000-0", room="lobby", nick="ann", text="hi", ts=1.5, node="n1")
    assert sse.message(msg.id, msg.public_json()) == (
        b"id: 1700000000000-0\n"
        b"event: message\n"
        b'data: {"id":"1700000000000-0","room":"lobby","nick":"ann","text":"hi","ts":1.5,"node":"n1"}\n'
        b"\n"
    )


def test_multiline_text_stays_on_one_data_line_as_json_escapes() -> None:
    msg = Message(id="5-1", room="r", nick="n", text="one\ntwo\r\nthree", ts=0.0, node="x")
    frame = sse.message(msg.id, msg.public_json())
    assert frame == (
        b'id: 5-1\nevent: message\ndata: {"id":"5-1","room":"r","nick":"n",'
        b'"text":"one\\ntwo\\r\\nthree","ts":0.0,"node":"x"}\n\n'
    )
    assert frame.count(b"\n") == 4


def test_unicode_is_utf8_on_the_wire() -> None:
    msg = Message(id="7-0", room="r", nick="zoë", text="héllo 👋 日本", ts=0.0, node="x")
    frame = sse.message(msg.id, msg.public_json())
    assert "zoë".encode() in frame
    assert "héllo 👋 日本".encode() in frame
    assert frame.decode("utf-8").endswith('"node":"x"}\n\n')


def test_generic_event_splits_multiline_data() -> None:
    assert sse.event("a\nb\r\nc", event="note", id="1-2") == (
        b"id: 1-2\nevent: note\ndata: a\ndata: b\ndata: c\n\n")
    assert sse.event("") == b"data: \n\n"


def test_json_event_has_no_id() -> None:
    assert sse.json_event("presence", {"room": "lobby", "count": 3}) == (
        b'event: presence\ndata: {"room":"lobby","count":3}\n\n')
    assert sse.json_event("reset", {"reason": "history_truncated", "oldest": "9-0"}) == (
        b'event: reset\ndata: {"reason":"history_truncated","oldest":"9-0"}\n\n')


def test_retry_and_comments_are_lines_that_end_no_event() -> None:
    # No blank line after them: a data-less block is an empty "message" in common clients.
    assert sse.retry(2000) == b"retry: 2000\n"
    assert sse.comment("ping") == b": ping\n"
    assert sse.comment() == b":\n"
    assert sse.PING == b": ping\n"


def test_retry_jitter_is_within_half_either_way() -> None:
    rng = random.Random(7)
    values = [sse.jittered_retry(2000, rng) for _ in range(500)]
    assert min(values) >= 1000 and max(values) <= 3000
    assert len(set(values)) > 100  # really spread, not a constant


def test_field_values_cannot_smuggle_lines() -> None:
    with pytest.raises(ValueError):
        sse.event("x", id="1\nevent: evil")
    with pytest.raises(ValueError):
        sse.comment("a\nb")
