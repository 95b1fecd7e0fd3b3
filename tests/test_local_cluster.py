"""conf/local_cluster.py: a whole cluster on one machine without Docker, started and stopped.

The script is run as an operator would (``start --detach`` then ``stop``;
``start`` in the foreground then Ctrl-C). Each time: every process it
lists is running, the nodes find the master through Sentinel and judge the
cluster healthy, a message posted through its nginx arrives on a stream
opened through its nginx, and after the stop not one of its PIDs still runs.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from probes import free_port, require_tool, wait_for
from sse_client import SSEClient

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "conf" / "local_cluster.py"
NAMES = {"master", "replica-1", "replica-2", "sentinel", "node-a", "node-b", "nginx"}

pytestmark = pytest.mark.nginx


def env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("RTCHAT_")}


def running(pid: int) -> bool:
    """Alive and not a zombie waiting to be reaped."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state != "Z"


def get_json(url: str) -> dict:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=5) as r:
        return json.loads(r.read())


def check_cluster(info: dict) -> None:
    assert set(info["pids"]) == NAMES
    for name, pid in info["pids"].items():
        assert running(pid), f"{name} (pid {pid}) is not running"
    status = wait_for(lambda: (lambda s: s if s["verdict"]["state"] == "healthy"
                               and len(s["cluster"]["nodes"]) == 2 else None)(
        get_json(info["admin"]["node-a"] + "/api/status")), 20, "a healthy two-node cluster",
        ignore=(OSError, ValueError))
    assert sorted(n["id"] for n in status["cluster"]["nodes"]) == ["local-a", "local-b"]
    urls = {e["url"] for e in status["redis"]["endpoints"]}
    assert urls == {info["redis"]["master"], *info["redis"]["replicas"]}  # found via Sentinel

    chat = info["chat"].rstrip("/")

    async def through_nginx() -> None:
        listener = await SSEClient.open(chat, "local", nick="lis")
        try:
            assert listener.status == 200
            posted = await asyncio.to_thread(post, chat + "/rooms/local/messages",
                                             {"nick": "ann", "text": "through nginx"})
            (msg,) = await listener.messages(1)
            assert (msg["id"], msg["text"]) == (posted["id"], "through nginx")
        finally:
            await listener.aclose()

    asyncio.run(through_nginx())


def post(url: str, body: dict) -> dict:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with opener.open(req, timeout=5) as r:
        assert r.status == 201
        return json.loads(r.read())


def all_gone(pids: dict[str, int]) -> None:
    wait_for(lambda: not any(running(p) for p in pids.values()), 30,
             f"every process to be gone: {[n for n, p in pids.items() if running(p)]}")


def test_detached_cluster_serves_through_nginx_and_stop_ends_every_process(tmp_path) -> None:
    require_tool("redis-server")
    require_tool("nginx")
    run_dir = tmp_path / "run"
    result = subprocess.run([sys.executable, str(SCRIPT), "start", "--detach", "--run-dir",
                             str(run_dir)], capture_output=True, text=True, timeout=120, env=env())
    try:
        assert result.returncode == 0, result.stdout + result.stderr
        info = json.loads((run_dir / "cluster.json").read_text())
        assert info["chat"] in result.stdout and info["admin"]["node-b"] in result.stdout
        assert info["redis"]["master"] in result.stdout
        assert ":6379/" not in result.stdout  # never the system Redis
        check_cluster(info)
        stopped = subprocess.run([sys.executable, str(SCRIPT), "stop", "--run-dir", str(run_dir)],
                                 capture_output=True, text=True, timeout=120, env=env())
        assert stopped.returncode == 0, stopped.stderr
        assert stopped.stdout.count("stopped ") == 7
        all_gone(info["pids"])
        assert not (run_dir / "pids.json").exists()
    finally:
        if (run_dir / "pids.json").exists():
            subprocess.run([sys.executable, str(SCRIPT), "stop", "--run-dir", str(run_dir)],
                           capture_output=True, timeout=120, env=env())


def test_foreground_cluster_on_a_given_port_stops_everything_on_ctrl_c(tmp_path) -> None:
    require_tool("redis-server")
    require_tool("nginx")
    run_dir = tmp_path / "run"
    port = free_port()
    log = tmp_path / "script.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, str(SCRIPT), "start", "--run-dir", str(run_dir),
                                 "--port", str(port)], stdout=out, stderr=subprocess.STDOUT,
                                env=env())
    try:
        wait_for(lambda: proc.poll() is not None or b"Ctrl-C stops" in log.read_bytes(), 120,
                 "the cluster to start")
        assert proc.poll() is None, log.read_text()
        info = json.loads((run_dir / "cluster.json").read_text())
        assert info["chat"] == f"http://127.0.0.1:{port}/"
        check_cluster(info)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=90) == 0, log.read_text()
        all_gone(info["pids"])
        assert log.read_text().count("stopped ") == 7
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=90)


def test_a_busy_port_is_refused_before_anything_starts(tmp_path) -> None:
    require_tool("redis-server")
    require_tool("nginx")
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        result = subprocess.run([sys.executable, str(SCRIPT), "start", "--run-dir",
                                 str(tmp_path / "run"), "--port", str(port)],
                                capture_output=True, text=True, timeout=60, env=env())
    assert result.returncode == 1
    assert f"nginx: port {port} is in use" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run" / "pids.json").exists()
