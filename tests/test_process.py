"""The real ``rtchat`` command: graceful shutdown, and the installed package serving its page."""

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from probes import http_get, wait_for
from sse_client import SSEClient

ROOT = Path(__file__).resolve().parent.parent


def test_sigterm_drains_open_streams_and_exits_0(spawn_node) -> None:
    drain = 1.5
    node = spawn_node(env={"RTCHAT_SHUTDOWN__DRAIN_SECONDS": str(drain)})

    async def scenario() -> tuple[list[float], float]:
        clients = [await SSEClient.open(node.url, "bye") for _ in range(10)]
        assert all(c.status == 200 for c in clients)
        started = time.monotonic()
        node.signal(signal.SIGTERM)
        # Readiness turns off at once, while the streams are still draining.
        _, body = await asyncio.to_thread(
            wait_for, lambda: (lambda r: r if r[0] == 503 else None)(http_get(node.url + "/readyz")),
            5, "readyz to turn 503")
        assert b"draining" in body
        async def closed_at(c: SSEClient) -> float:
            await c.until_closed(timeout=drain + 5)
            await c.aclose()
            return time.monotonic() - started

        ends = await asyncio.gather(*(closed_at(c) for c in clients))
        return list(ends), started

    ends, _ = asyncio.run(scenario())
    assert node.proc.wait(timeout=10) == 0
    assert max(ends) <= drain + 2.0, f"streams closed after {max(ends):.2f}s"
    assert max(ends) - min(ends) > 0.05, "streams should close spread over the drain, not at once"
    log = node.log()
    assert "draining" in log and "stopped" in log
    assert "Traceback" not in log


def test_sigint_with_no_clients_exits_0_promptly(spawn_node) -> None:
    node = spawn_node()
    node.signal(signal.SIGINT)
    assert node.proc.wait(timeout=10) == 0


def test_port_in_use_is_a_clear_error(spawn_node) -> None:
    node = spawn_node()
    result = subprocess.run(
        [sys.executable, "-m", "rtchat", "--host", "127.0.0.1", "--port", str(node.port)],
        capture_output=True, text=True, timeout=30,
        env={**{k: v for k, v in os.environ.items() if not k.startswith("RTCHAT_")}})
    assert result.returncode == 1
    assert "cannot serve on 127.0.0.1" in result.stderr
    assert "Traceback" not in result.stderr


def test_installed_wheel_serves_the_chat_page(tmp_path, spawn_node) -> None:
    """Build a wheel, install it away from the source tree, and load the page from it."""
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(wheels), str(ROOT)], check=True, timeout=300,
                   capture_output=True)
    (wheel,) = wheels.glob("rtchat-*.whl")
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target",
                    str(site), str(wheel)], check=True, timeout=300, capture_output=True)
    assert (site / "rtchat" / "templates" / "chat.html").is_file()
    # Every package, and the Lua the Redis broker reads next to its module.
    assert (site / "rtchat" / "broker" / "redis" / "publish.lua").is_file()
    assert (site / "rtchat" / "broker" / "redis" / "broker.py").is_file()
    assert (site / "rtchat" / "bench" / "__main__.py").is_file()
    assert (site / "rtchat" / "admin" / "static" / "admin.js").is_file()  # the admin page's script
    assert (site / "rtchat" / "static" / "chat-worker.js").is_file()  # the chat's shared stream
    # Only the installed copy is importable: the source tree is not on the path.
    run_dir = tmp_path / "elsewhere"
    run_dir.mkdir()
    where = subprocess.run([sys.executable, "-c", "import rtchat; print(rtchat.__file__)"],
                           capture_output=True, text=True, cwd=run_dir, check=True,
                           env={"PYTHONPATH": str(site), "PATH": os.environ.get("PATH", "")})
    assert where.stdout.strip().startswith(str(site))
    node = spawn_node(cwd=str(run_dir), extra_path=str(site))
    status, page = http_get(node.url + "/rooms/lobby")
    assert status == 200
    assert b"EventSource" in page and b"#lobby" in page
    status, script = http_get(node.url + "/static/admin.js")
    assert status == 200 and b"initial-status" in script
    status, worker = http_get(node.url + "/static/chat-worker.js")
    assert status == 200 and b"SharedWorkerGlobalScope" in worker and b"EventSource" in worker


@pytest.mark.parametrize("args", [["--port", "notaport"], ["--bogus"]])
def test_bad_command_line_exits_2_without_traceback(args) -> None:
    result = subprocess.run([sys.executable, "-m", "rtchat", *args], capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 2
    assert "usage: rtchat" in result.stderr and "Traceback" not in result.stderr
