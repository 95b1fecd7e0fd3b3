"""The admin page's two pictures as plain data: the topology and the throughput sparkline.

Owns the topology layout (three columns: nodes -> replicas -> master, with
every link coloured by health) and the sparkline's polyline points and
scale, so the admin page's script draws what it is given and holds none of
the rules. Pure: input is the node list and the broker's
``BrokerStatus``; output is plain JSON-ready data.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

from rtchat.broker.base import BrokerStatus, EndpointStatus

BOX_W = 200
BOX_H = 46
COL_GAP = 80
ROW_GAP = 14
PAD = 8
LABEL_CHARS = 24  # longer labels are cut with an ellipsis; the full text is the box's title


def short_endpoint(url: str) -> str:
    """``host:port`` of a Redis URL (the path for unix sockets); the URL itself when unparsable."""
    try:
        parts = urlsplit(url)
        if parts.scheme == "unix":
            return parts.path or url
        if parts.hostname:
            return f"{parts.hostname}:{parts.port or 6379}"
    except ValueError:
        pass
    return url


def _cut(text: str) -> str:
    return text if len(text) <= LABEL_CHARS else text[: LABEL_CHARS - 1] + "…"


def _endpoint_state(ep: EndpointStatus) -> str:
    if ep.reachable is False:
        return "bad"
    if ep.healthy:
        return "ok"
    return "warn" if ep.reachable is None else "bad"


def _replication_state(replica: EndpointStatus, master: EndpointStatus | None) -> str:
    """A replica's link to the master: red unless both ends are up and the link says so."""
    if master is None or master.reachable is False:
        return "bad"
    if replica.reachable is None or master.reachable is None:
        return "warn"  # not checked yet
    if not replica.reachable or replica.master_link_status != "up":
        return "bad"
    return "ok" if replica.healthy else "bad"


def topology(nodes: Sequence[Mapping[str, Any]], broker: BrokerStatus, self_id: str
           ) -> dict[str, Any]:
    """Boxes ``{id, kind, x, y, w, h, label, detail, title, state, self}`` and links
    ``{x1, y1, x2, y2, d, kind, state}`` (state: ok | warn | bad), plus the canvas size."""
    endpoints = list(broker.endpoints)
    embedded = broker.backend == "memory"
    masters = [ep for ep in endpoints if ep.configured_role == "master"]
    replicas = [ep for ep in endpoints if ep.configured_role != "master"]
    master = masters[0] if masters else None

    columns: list[list[dict[str, Any]]] = [[]]
    for n in nodes:
        clients = n.get("clients")
        node_id = str(n.get("id", "?"))
        columns[0].append({
            "id": f"node:{node_id}", "kind": "node", "label": _cut(node_id),
            "detail": (f"{clients} client{'' if clients == 1 else 's'}" if clients is not None
                       else "clients unknown") + (" · this node" if node_id == self_id else ""),
            "title": f"node {node_id} at {n.get('address', '?')}, reads {n.get('endpoint') or 'nothing'}",
            "state": "warn" if n.get("draining") else "ok", "self": node_id == self_id,
            "_endpoint": n.get("endpoint"),
        })
    if embedded:
        columns.append([{
            "id": "embedded", "kind": "embedded", "label": "embedded broker",
            "detail": "in process, no Redis", "title": "the in-process memory broker",
            "state": "ok", "self": False,
        }])
    else:
        if replicas:
            columns.append([_endpoint_box(ep, "replica") for ep in replicas])
        columns.append([_endpoint_box(ep, "master") for ep in masters])

    rows = max(len(col) for col in columns) or 1
    height = PAD * 2 + rows * BOX_H + (rows - 1) * ROW_GAP
    width = PAD * 2 + len(columns) * BOX_W + (len(columns) - 1) * COL_GAP
    boxes: dict[str, dict[str, Any]] = {}
    for c, col in enumerate(columns):
        # Centre each column vertically so links fan in rather than run along the top.
        col_h = len(col) * BOX_H + max(0, len(col) - 1) * ROW_GAP
        top = (height - col_h) / 2
        for r, box in enumerate(col):
            box.update(x=PAD + c * (BOX_W + COL_GAP), y=round(top + r * (BOX_H + ROW_GAP), 1),
                       w=BOX_W, h=BOX_H)
            boxes[box["id"]] = box

    links: list[dict[str, Any]] = []
    by_url = {ep.url: ep for ep in endpoints}
    for box in columns[0]:
        target_url = box.pop("_endpoint")
        if embedded:
            links.append(_link(box, boxes["embedded"], "subscribe", "ok"))
            continue
        ep = by_url.get(target_url)
        if ep is None:
            # A node that reads nothing (or from a server this node does not know): no link.
            box["state"] = "bad" if not target_url else "warn"
            continue
        links.append(_link(box, boxes[f"ep:{ep.url}"], "subscribe", _endpoint_state(ep)))
    if master is not None:
        for ep in replicas:
            links.append(_link(boxes[f"ep:{ep.url}"], boxes[f"ep:{master.url}"],
                               "replication", _replication_state(ep, master)))
    return {"width": width, "height": height,
            "boxes": [b for col in columns for b in col], "links": links}


def _endpoint_box(ep: EndpointStatus, kind: str) -> dict[str, Any]:
    url = ep.url
    role = ep.role or "unknown"
    if ep.reachable is False:
        detail = "unreachable"
    elif kind == "replica" and ep.lag_seconds is not None:
        detail = f"{role} · lag {ep.lag_seconds:.2f}s"
    else:
        detail = role
    if ep.subscribed:
        detail += " · ★ subscribed"
    return {"id": f"ep:{url}", "kind": kind, "label": _cut(short_endpoint(url)), "detail": detail,
            "title": f"{kind} {url}: {detail}", "state": _endpoint_state(ep), "self": False}


def _link(a: Mapping[str, Any], b: Mapping[str, Any], kind: str, state: str) -> dict[str, Any]:
    """From the right edge of ``a`` to the left edge of ``b``; ``d`` is a gentle S-curve path."""
    x1, y1 = a["x"] + a["w"], a["y"] + a["h"] / 2
    x2, y2 = b["x"], b["y"] + b["h"] / 2
    mid = (x1 + x2) / 2
    return {"x1": x1, "y1": y1, "x2": x2, "y2": y2, "kind": kind, "state": state,
            "d": f"M{x1:g} {y1:g} C{mid:g} {y1:g} {mid:g} {y2:g} {x2:g} {y2:g}"}


SPARK_W = 240
SPARK_H = 48


def _nice_ceiling(value: float) -> float:
    """The smallest of 1, 2, 2.5, 5 x 10^n at or above ``value``: a scale's top a person reads."""
    if value <= 1:
        return 1.0
    magnitude = 10 ** math.floor(math.log10(value))
    for step in (1, 2, 2.5, 5, 10):
        if step * magnitude >= value - 1e-9:
            return float(step * magnitude)
    return float(10 * magnitude)  # pragma: no cover - the loop always returns


def sparkline(series_in: Sequence[float], series_out: Sequence[float], slots: int,
              interval: float = 1.0) -> dict[str, Any]:
    """SVG polyline ``points`` for msgs in/out per second on one shared scale, newest at the right.

    ``slots`` is the ring buffer's size, so a young node's line grows from the right edge.
    The scale's top is a round number at or above the peak; ``scale`` gives the value lines
    (``value``, ``y``) and ``span_seconds`` the time the x axis covers.
    """
    peak = _nice_ceiling(max([*series_in, *series_out, 1.0]))
    step = SPARK_W / max(1, slots - 1)

    def points(values: Sequence[float]) -> str:
        start = slots - len(values)
        return " ".join(
            f"{(start + i) * step:.1f},{SPARK_H - 2 - v / peak * (SPARK_H - 4):.1f}"
            for i, v in enumerate(values))

    top, bottom = 2.0, SPARK_H - 2.0
    scale = [{"value": round(peak * f, 2), "y": round(bottom - f * (bottom - top), 1)}
             for f in (1.0, 0.5, 0.0)]
    return {"width": SPARK_W, "height": SPARK_H, "peak": round(peak, 2),
            "max": round(max([*series_in, *series_out, 0.0]), 2), "scale": scale,
            "span_seconds": round(max(1, slots - 1) * interval, 1),
            "in": points(series_in), "out": points(series_out)}
