#!/usr/bin/env python3
"""rtchat next to its peers: the same ``rtchat bench`` scenarios against five SSE servers.

Targets, each started here on free loopback ports and stopped at the end:

- ``rtchat-memory``: one rtchat node on the embedded memory broker;
- ``rtchat-redis``:  one rtchat node on Redis (its own redis-server master,
  AOF on, plus a replica the node subscribes from);
- ``nchan-memory``:  nginx + nchan, messages in nchan's shared memory;
- ``nchan-redis``:   nginx + nchan storing messages in its own redis-server;
- ``flask-sse``:     tests/perf/flask_sse_app.py under gunicorn, 5 gevent
  workers, with its own redis-server (as flask-sse's docs recommend).

Scenarios run interleaved (each scenario against every target in turn, the
order rotated per scenario), every target's server restarted before each
run so no run inherits another's leftovers. Prints a Markdown table to
stdout and writes every raw bench report to a JSON file.

Usage::

    python tests/perf/compare.py            # full run, under 15 minutes
    python tests/perf/compare.py --quick    # smoke run, a couple of minutes
    python tests/perf/compare.py --targets rtchat-memory,nchan-memory --scenarios latency

Needs: this repo's venv (tornado, redis, uvloop); ``redis-server`` on PATH;
nginx with Debian's ``libnginx-mod-nchan`` for the nchan targets; for
flask-sse ``pip install flask-sse gunicorn gevent``. A target whose needs are
missing is reported as skipped, with the reason. Never touches a Redis it did
not start (the system one on 6379 included). The machine is 2 cores: the
bench shares them with the server, so read ``bench CPU %`` next to the
throughput numbers (near 100% means the client, not the server, was the limit).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
NCHAN_MODULE = Path("/usr/lib/nginx/modules/ngx_nchan_module.so")
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024
START_TIMEOUT = 30.0
HOLD_SECONDS = 4.0


class Unavailable(Exception):
    """A target cannot run here; the message says what is missing."""


# --------------------------------------------------------------------------
# Processes, ports, readiness
# --------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_tree(root: int) -> list[int]:
    """``root`` and all its descendants, from /proc."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        parents.setdefault(ppid, []).append(int(entry))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(parents.get(pid, []))
    return tree


def rss_kib(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/statm") as f:
                total += int(f.read().split()[1]) * PAGE_KIB
        except OSError:
            pass
    return total


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
        except OSError:
            pass
    return total / CLK_TCK


def wait_quiet(pids: Callable[[], list[int]], timeout: float = 3.0, window: float = 0.25,
               max_cores: float = 0.1) -> None:
    """Wait (at most ``timeout``) until the processes use under ``max_cores`` CPU."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        c0 = cpu_seconds(pids())
        time.sleep(window)
        if cpu_seconds(pids()) - c0 < max_cores * window:
            return


class Service:
    """One child process with its output in a log file; stopped by its own pid only."""

    def __init__(self, name: str, argv: list[str], log_dir: Path, env: dict[str, str] | None = None,
                 cwd: Path | None = None) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, cwd=cwd,
                                         env={**os.environ, **(env or {})})

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise Unavailable(f"{self.name} exited with {self.proc.returncode}: "
                              f"{self.log_tail()}")

    def log_tail(self, lines: int = 5) -> str:
        try:
            text = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return " | ".join(text[-lines:])

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=timeout)


def wait_http(url: str, service: Service, timeout: float = START_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        service.check_alive()
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except urllib.error.HTTPError as e:
            last = f"HTTP {e.code}"
            e.close()
        except (urllib.error.URLError, OSError) as e:
            last = str(e)
        time.sleep(0.1)
    raise Unavailable(f"{service.name} not ready at {url} in {timeout:g}s ({last}): "
                      f"{service.log_tail()}")


def redis_command(port: int, *args: str, timeout: float = 2.0) -> bytes:
    """One Redis command over a raw socket (RESP); returns the raw reply."""
    payload = f"*{len(args)}\r\n".encode() + b"".join(
        f"${len(a.encode())}\r\n{a}\r\n".encode() for a in args)
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(payload)
        data = b""
        while not data.endswith(b"\r\n") or (data[:1] == b"$" and data.count(b"\r\n") < 2):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
        return data


class RedisServer:
    """A redis-server of our own on a free port (never the system one)."""

    def __init__(self, name: str, work: Path, replica_of: int | None = None,
                 appendonly: bool = False) -> None:
        if shutil.which("redis-server") is None:
            raise Unavailable("redis-server is not on PATH (apt-get install redis-server)")
        self.port = free_port()
        data_dir = work / name
        data_dir.mkdir(parents=True, exist_ok=True)
        argv = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                "--dir", str(data_dir), "--save", "", "--daemonize", "no",
                "--appendonly", "yes" if appendonly else "no", "--appendfsync", "everysec",
                "--maxclients", "18000", "--protected-mode", "yes"]
        if replica_of is not None:
            argv += ["--replicaof", "127.0.0.1", str(replica_of)]
        self.service = Service(name, argv, work)
        self.replica_of = replica_of
        self._wait_ready()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            self.service.check_alive()
            try:
                if self.replica_of is None:
                    if redis_command(self.port, "PING").startswith(b"+PONG"):
                        return
                elif b"master_link_status:up" in redis_command(self.port, "INFO", "replication"):
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise Unavailable(f"{self.service.name} did not come up: {self.service.log_tail()}")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def pids(self) -> list[int]:
        return [self.service.proc.pid] if self.service.proc.poll() is None else []

    def stop(self) -> None:
        self.service.stop()


# --------------------------------------------------------------------------
# Targets
# --------------------------------------------------------------------------


class Target:
    """An SSE server under test: its helpers (Redis) live all run, the server restarts per run."""

    name = ""

    def __init__(self, work: Path) -> None:
        self.work = work / self.name
        self.work.mkdir(parents=True, exist_ok=True)
        self.port = 0
        self.server: Service | None = None
        self.redis: list[RedisServer] = []

    def check(self) -> None:
        """Raise :class:`Unavailable` if something this target needs is missing."""

    def start_helpers(self) -> None:
        """Start what lives for the whole run (Redis)."""

    def start_server(self) -> None:
        raise NotImplementedError

    def bench_args(self) -> list[str]:
        raise NotImplementedError

    def restart(self) -> None:
        self.stop_server()
        self.port = free_port()
        self.start_server()

    def stop_server(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None

    def stop(self) -> None:
        self.stop_server()
        for r in reversed(self.redis):
            r.stop()
        self.redis = []

    def server_pids(self) -> list[int]:
        if self.server is None or self.server.proc.poll() is not None:
            return []
        return process_tree(self.server.proc.pid)

    def helper_pids(self) -> list[int]:
        return [p for r in self.redis for p in r.pids()]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


class RtchatTarget(Target):
    def __init__(self, work: Path, use_redis: bool) -> None:
        self.name = "rtchat-redis" if use_redis else "rtchat-memory"
        self.use_redis = use_redis
        super().__init__(work)

    def check(self) -> None:
        if not (ROOT / "rtchat" / "__main__.py").exists():
            raise Unavailable("rtchat/__main__.py is missing")
        if self.use_redis and not (ROOT / "rtchat" / "broker" / "redis" / "__init__.py").exists():
            raise Unavailable("rtchat/broker/redis/ is missing")

    def start_helpers(self) -> None:
        if self.use_redis:
            master = RedisServer("redis-master", self.work, appendonly=True)
            self.redis.append(master)
            self.redis.append(RedisServer("redis-replica", self.work, replica_of=master.port))

    def start_server(self) -> None:
        env = {
            "PYTHONPATH": str(ROOT),
            "RTCHAT_LIMITS__RATE__MESSAGES_PER_SECOND": "1000000",
            "RTCHAT_LIMITS__RATE__BURST": "1000000",
            # Every bench client is 127.0.0.1: lift the per-address limits too (the
            # stream cap would hold a 10,000-stream run to 100).
            "RTCHAT_LIMITS__MAX_STREAMS_PER_ADDRESS": "1000000",
            "RTCHAT_LIMITS__MAX_CONNECTIONS_PER_ADDRESS": "1000000",
            "RTCHAT_LIMITS__MAX_CLIENTS": "1000000",
            "RTCHAT_LIMITS__READ_RATE__REQUESTS_PER_SECOND": "1000000",
            "RTCHAT_LIMITS__READ_RATE__BURST": "1000000",
            "RTCHAT_LOGGING__LEVEL": "warning",
            "RTCHAT_SHUTDOWN__DRAIN_SECONDS": "0",
        }
        if self.use_redis:
            env["RTCHAT_BROKER__BACKEND"] = "redis"
            env["RTCHAT_BROKER__REDIS__MASTER"] = self.redis[0].url
            env["RTCHAT_BROKER__REDIS__REPLICAS"] = f"[{self.redis[1].url}]"
        self.server = Service(f"{self.name}-node", [
            sys.executable, "-m", "rtchat", "--host", "127.0.0.1", "--port", str(self.port)],
            self.work, env=env, cwd=ROOT)
        wait_http(self.url + "/readyz", self.server)

    def bench_args(self) -> list[str]:
        return ["--url", self.url]


NGINX_CONF = """\
load_module {module};
worker_processes auto;
worker_rlimit_nofile {nofile};
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
{user}
events {{ worker_connections {nofile}; }}
http {{
  access_log off;
  client_body_temp_path {dir}/tmp-body;
  proxy_temp_path {dir}/tmp-proxy;
  fastcgi_temp_path {dir}/tmp-fastcgi;
  uwsgi_temp_path {dir}/tmp-uwsgi;
  scgi_temp_path {dir}/tmp-scgi;
  nchan_shared_memory_size 512M;
  {redis_upstream}
  server {{
    listen 127.0.0.1:{port} backlog=4096;
    location = /healthz {{ return 200 "ok\\n"; }}
    location ~ ^/sub/([A-Za-z0-9_-]+)$ {{
      nchan_subscriber eventsource;
      nchan_channel_id $1;
      nchan_subscriber_first_message newest;
      {redis_pass}
    }}
    location ~ ^/pub/([A-Za-z0-9_-]+)$ {{
      nchan_publisher;
      nchan_channel_id $1;
      nchan_message_buffer_length 1000;
      nchan_message_timeout 1h;
      {redis_pass}
    }}
  }}
}}
"""


class NchanTarget(Target):
    def __init__(self, work: Path, use_redis: bool) -> None:
        self.name = "nchan-redis" if use_redis else "nchan-memory"
        self.use_redis = use_redis
        super().__init__(work)

    def check(self) -> None:
        if shutil.which("nginx") is None:
            raise Unavailable("nginx is not on PATH (apt-get install nginx libnginx-mod-nchan)")
        if not NCHAN_MODULE.exists():
            raise Unavailable(f"{NCHAN_MODULE} is missing (apt-get install libnginx-mod-nchan)")

    def start_helpers(self) -> None:
        if self.use_redis:
            self.redis.append(RedisServer("redis", self.work))

    def _conf(self) -> Path:
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        redis_upstream = redis_pass = ""
        if self.use_redis:
            # The form nchan 1.3 recommends; same storage as the legacy
            # `nchan_redis_url` + `nchan_use_redis on`, which it warns about.
            redis_upstream = (f"upstream nchan_redis {{ nchan_redis_server "
                              f"{self.redis[0].url}; }}")
            redis_pass = "nchan_redis_pass nchan_redis;"
        conf = self.work / "nginx.conf"
        conf.write_text(NGINX_CONF.format(
            module=NCHAN_MODULE, dir=self.work, port=self.port, nofile=min(soft, 40000),
            user="user root;" if os.geteuid() == 0 else "",
            redis_upstream=redis_upstream, redis_pass=redis_pass))
        return conf

    def start_server(self) -> None:
        conf = self._conf()
        test = subprocess.run(["nginx", "-t", "-p", str(self.work), "-c", str(conf)],
                              capture_output=True, text=True, check=False)
        if test.returncode != 0:
            raise Unavailable(f"nginx -t failed: {test.stderr.strip()[-300:]}")
        self.server = Service(f"{self.name}-nginx",
                              ["nginx", "-p", str(self.work), "-c", str(conf)], self.work)
        wait_http(self.url + "/healthz", self.server)

    def bench_args(self) -> list[str]:
        return ["--url", self.url, "--sub-url", "{url}/sub/{room}", "--pub-url", "{url}/pub/{room}",
                "--pub-format", "raw"]


class FlaskSseTarget(Target):
    name = "flask-sse"

    def check(self) -> None:
        missing = [m for m in ("flask_sse", "gunicorn", "gevent")
                   if importlib.util.find_spec(m) is None]
        if missing:
            raise Unavailable(f"missing {', '.join(missing)} "
                              "(pip install flask-sse gunicorn gevent)")

    def start_helpers(self) -> None:
        self.redis.append(RedisServer("redis", self.work))

    def start_server(self) -> None:
        argv = [sys.executable, "-m", "gunicorn", "-k", "gevent", "-w", "5",
                "--worker-connections", "10000", "--backlog", "4096", "--timeout", "120",
                "--graceful-timeout", "3", "--log-level", "warning",
                "-b", f"127.0.0.1:{self.port}", "tests.perf.flask_sse_app:app"]
        if "--no-control-socket" in _gunicorn_help():
            argv.insert(-1, "--no-control-socket")
        self.server = Service(f"{self.name}-gunicorn", argv, self.work, cwd=ROOT,
                              env={"SSE_REDIS_URL": self.redis[0].url, "PYTHONPATH": str(ROOT)})
        wait_http(self.url + "/healthz", self.server)

    def bench_args(self) -> list[str]:
        return ["--url", self.url, "--sub-url", "{url}/stream?channel={room}"]


_GUNICORN_HELP: list[str] = []


def _gunicorn_help() -> str:
    if not _GUNICORN_HELP:
        out = subprocess.run([sys.executable, "-m", "gunicorn", "--help"], capture_output=True,
                             text=True, check=False)
        _GUNICORN_HELP.append(out.stdout)
    return _GUNICORN_HELP[0]


TARGETS: dict[str, Callable[[Path], Target]] = {
    "rtchat-memory": lambda w: RtchatTarget(w, use_redis=False),
    "rtchat-redis": lambda w: RtchatTarget(w, use_redis=True),
    "nchan-memory": lambda w: NchanTarget(w, use_redis=False),
    "nchan-redis": lambda w: NchanTarget(w, use_redis=True),
    "flask-sse": FlaskSseTarget,
}


# --------------------------------------------------------------------------
# Scenarios
# --------------------------------------------------------------------------


def flag_values(args: list[str]) -> dict[str, str]:
    """``["--clients", "5", "--rate", "0"]`` -> ``{"--clients": "5", "--rate": "0"}``."""
    return dict(zip(args[::2], args[1::2], strict=True))


@dataclass(frozen=True)
class Scenario:
    name: str
    what: str  # what it measures; the shape (clients, rooms, rate) is read from the args
    full: list[str]
    quick: list[str]
    idle: bool = False  # measure RSS per open stream instead of deliveries
    rows: list[tuple[str, Callable[[dict[str, Any]], str]]] = field(default_factory=list)

    def title(self, quick: bool) -> str:
        opts = flag_values(self.quick if quick else self.full)
        clients = int(opts.get("--clients", 0))
        if self.idle:
            return f"{self.what}: {clients:,} streams"
        rooms = int(opts.get("--rooms", 1))
        rate = float(opts.get("--rate", 50))
        pace = f"{rate:,.0f} msg/s" if rate else "unpaced"
        return (f"{self.what}: {clients:,} clients, {rooms} room{'s' if rooms > 1 else ''}, "
                f"{pace}, {int(opts.get('--messages', 0)):,} msgs")


def _num(value: float | None, digits: int = 0, suffix: str = "") -> str:
    if value is None:
        return "—"
    if digits == 0 and abs(value) >= 10000:
        return f"{value / 1000:.0f}k{suffix}"
    return f"{value:,.{digits}f}{suffix}"


def _lost(r: dict[str, Any]) -> str:
    if not r.get("expected"):
        return "—"
    pct = 100.0 * r["lost"] / r["expected"]
    extra = f", {r['disconnects']} dropped" if r.get("disconnects") else ""
    return f"{pct:.1f}%{extra}" if r["lost"] else f"0{extra}"


def _lat(key: str) -> Callable[[dict[str, Any]], str]:
    return lambda r: _num(r["latency_ms"][key], 1)


def _dps(r: dict[str, Any]) -> str:
    return _num(r["deliveries_per_second"])


def _sends(r: dict[str, Any]) -> str:
    """Acknowledged sends per second, and how many the time limit left unsent."""
    unsent = f" ({r['unsent']:,} unsent)" if r.get("unsent") else ""
    return _num(r["publish_per_second"]) + unsent


def _cpu(r: dict[str, Any]) -> str:
    return f"{r['send_cpu_percent']:.0f}% / {r['server_cpu_percent']:.0f}%"


SCENARIOS = [
    Scenario("latency", "latency",
             ["--clients", "100", "--rate", "50", "--messages", "500"],
             ["--clients", "100", "--rate", "50", "--messages", "100"],
             rows=[("latency p50 ms", _lat("p50")), ("latency p99 ms", _lat("p99")),
                   ("lost", _lost)]),
    Scenario("publish", "publish rate (16 connections)",
             ["--clients", "10", "--rate", "0", "--messages", "4000", "--publishers", "16"],
             ["--clients", "10", "--rate", "0", "--messages", "500", "--publishers", "16"],
             rows=[("publish req/s", lambda r: _num(r["publish_per_second"])),
                   ("publish p99 ms", lambda r: _num(r["publish_ms"]["p99"], 1)),
                   ("refused sends", lambda r: str(r["send_errors"])),
                   ("CPU sending: bench / server", _cpu)]),
    Scenario("fanout-200", "fan-out",
             ["--clients", "1000", "--rate", "200", "--messages", "1000"],
             ["--clients", "1000", "--rate", "200", "--messages", "200"],
             rows=[("deliveries/s", _dps), ("sends done/s", _sends),
                   ("latency p99 ms", _lat("p99")), ("lost", _lost),
                   ("CPU sending: bench / server", _cpu)]),
    Scenario("rooms-50", "many rooms",
             ["--clients", "1000", "--rooms", "50", "--rate", "200", "--messages", "1000"],
             ["--clients", "1000", "--rooms", "50", "--rate", "200", "--messages", "200"],
             rows=[("deliveries/s", _dps), ("latency p99 ms", _lat("p99")), ("lost", _lost)]),
    Scenario("fanout-1000", "fan-out, high rate",
             ["--clients", "1000", "--rate", "1000", "--messages", "3000"],
             ["--clients", "1000", "--rate", "1000", "--messages", "500"],
             rows=[("deliveries/s", _dps), ("sends done/s", _sends),
                   ("latency p99 ms", _lat("p99")), ("lost", _lost),
                   ("CPU sending: bench / server", _cpu)]),
    Scenario("room-5000", "big room",
             ["--clients", "5000", "--rate", "20", "--messages", "100",
              "--connect-timeout", "30"],
             ["--clients", "2000", "--rate", "20", "--messages", "20"],
             rows=[("connect all streams, s", lambda r: _num(r["connect_seconds"], 2)),
                   ("deliveries/s", _dps), ("sends done/s", _sends),
                   ("latency p50 ms", _lat("p50")),
                   ("latency p99 ms", _lat("p99")), ("lost", _lost),
                   ("CPU sending: bench / server", _cpu)]),
    Scenario("idle-1000", "idle", ["--clients", "1000"], ["--clients", "1000"],
             idle=True),
    Scenario("idle-10000", "idle", ["--clients", "10000", "--connect-timeout", "60"],
             ["--clients", "3000"], idle=True),
]
IDLE_ROWS: list[tuple[str, Callable[[dict[str, Any]], str]]] = [
    ("connect all streams, s", lambda r: _num(r["connect_seconds"], 2)),
    ("server RSS KiB/stream", lambda r: _num(r.get("server_kib_per_stream"), 1)),
    ("Redis RSS KiB/stream", lambda r: _num(r.get("redis_kib_per_stream"), 1)
     if r.get("redis_kib_per_stream") is not None else "—"),
]


# --------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------


def bench_command(target: Target, args: list[str], settle: float) -> list[str]:
    """The bench run; a server that cannot keep up gets 10 s past the planned send time."""
    opts = flag_values(args)
    rate = float(opts.get("--rate", 50))
    planned = int(opts.get("--messages", 0)) / rate if rate else 0.0
    return [sys.executable, "-m", "rtchat.bench", *target.bench_args(), *args,
            "--settle-seconds", str(settle), "--sync-timeout", "15",
            "--max-send-seconds", f"{planned + 10:g}"]


def run_bench(argv: list[str], timeout: float, log: Path,
              on_line: dict[bytes, Callable[[], None]]) -> dict[str, Any]:
    """Run one bench, calling ``on_line[marker]()`` when a stderr line starting so appears.

    Its stderr goes to ``log``; returns its JSON report.
    """
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.stderr is not None and proc.stdout is not None
    deadline = time.monotonic() + timeout
    pending = dict(on_line)
    out = b""
    with selectors.DefaultSelector() as sel, open(log, "ab") as err:
        sel.register(proc.stderr, selectors.EVENT_READ, "err")
        sel.register(proc.stdout, selectors.EVENT_READ, "out")
        partial = b""
        open_pipes = 2
        while open_pipes and time.monotonic() < deadline:
            for key, _ in sel.select(timeout=1.0):
                chunk = os.read(key.fileobj.fileno(), 65536)  # type: ignore[union-attr]
                if not chunk:
                    sel.unregister(key.fileobj)
                    open_pipes -= 1
                elif key.data == "out":
                    out += chunk
                else:
                    err.write(chunk)
                    *lines, partial = (partial + chunk).split(b"\n")
                    for line in lines:
                        for marker in [m for m in pending if line.startswith(m)]:
                            pending.pop(marker)()
        if open_pipes:
            proc.kill()
            proc.wait(timeout=30)
            raise RuntimeError(f"bench timed out after {timeout:.0f}s; see {log}")
        proc.wait(timeout=30)
    if proc.returncode != 0:
        raise RuntimeError(f"bench exited {proc.returncode}; see {log}")
    return json.loads(out)


def run_load(target: Target, argv: list[str], timeout: float, log: Path) -> dict[str, Any]:
    """A load run; server CPU is measured while sending and settling, as the bench's own is."""
    def pids() -> list[int]:
        return target.server_pids() + target.helper_pids()

    mark: dict[str, float] = {}

    def sending() -> None:
        mark["cpu"], mark["wall"] = cpu_seconds(pids()), time.monotonic()

    def settled() -> None:
        mark["cpu_end"], mark["wall_end"] = cpu_seconds(pids()), time.monotonic()

    report = run_bench(argv, timeout, log, {b"bench: sending": sending,
                                            b"bench: done": settled})
    if "cpu" in mark and "cpu_end" in mark and mark["wall_end"] > mark["wall"]:
        used = mark["cpu_end"] - mark["cpu"]
        report["server_cpu_seconds"] = round(used, 2)
        report["server_cpu_percent"] = round(100 * used / (mark["wall_end"] - mark["wall"]), 1)
    return report


def run_idle(target: Target, argv: list[str], timeout: float, log: Path) -> dict[str, Any]:
    """Open the streams, hold them, and read RSS before and while they are open."""
    wait_quiet(target.server_pids)
    before = rss_kib(target.server_pids())
    redis_before = rss_kib(target.helper_pids())
    during: dict[str, int] = {}

    def holding() -> None:
        wait_quiet(target.server_pids, timeout=HOLD_SECONDS / 2)
        during["server"] = rss_kib(target.server_pids())
        during["redis"] = rss_kib(target.helper_pids())

    report = run_bench([*argv, "--messages", "0", "--hold-seconds", str(HOLD_SECONDS)],
                       timeout, log, {b"bench: holding": holding})
    streams = report["connected"]
    if during and streams:
        report["server_kib_per_stream"] = round((during["server"] - before) / streams, 2)
        if target.redis:
            report["redis_kib_per_stream"] = round((during["redis"] - redis_before) / streams, 2)
    report["server_rss_kib"] = {"before": before, "during": during.get("server")}
    return report


def estimate_seconds(args: list[str], settle: float) -> float:
    """A typical run's length (the settle wait usually ends early), for the time budget."""
    opts = flag_values(args)
    messages, rate = int(opts.get("--messages", 0)), float(opts.get("--rate", 50))
    clients = int(opts.get("--clients", 0))
    send = messages / rate if rate else messages / 1000
    return 3 + clients / 2000 + send + (min(settle, 3.0) if messages else HOLD_SECONDS)


def run_timeout(args: list[str], settle: float) -> float:
    """The most a run may take: connect and sync limits, capped sends, settle, slack."""
    opts = flag_values(args)
    rate = float(opts.get("--rate", 50))
    planned = int(opts.get("--messages", 0)) / rate if rate else 0.0
    connect = float(opts.get("--connect-timeout", 10))
    return connect + 15 + planned + 10 + settle + HOLD_SECONDS + 60


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smaller runs: a smoke test")
    p.add_argument("--targets", default=",".join(TARGETS),
                   help=f"comma-separated, from {', '.join(TARGETS)}")
    p.add_argument("--scenarios", default=",".join(s.name for s in SCENARIOS),
                   help=f"comma-separated, from {', '.join(s.name for s in SCENARIOS)}")
    p.add_argument("--json", default=None, metavar="PATH",
                   help="where to write the raw results "
                        "(default: $TMPDIR/rtchat-compare-<time>.json)")
    p.add_argument("--budget-seconds", type=float, default=840.0,
                   help="skip runs that would end past this (default 840: a full run < 15 min)")
    p.add_argument("--keep", action="store_true", help="keep the work directory (configs, logs)")
    ns = p.parse_args(argv)
    names = [n for n in ns.targets.split(",") if n]
    scenario_names = [n for n in ns.scenarios.split(",") if n]
    unknown = [n for n in names if n not in TARGETS] + [
        n for n in scenario_names if n not in {s.name for s in SCENARIOS}]
    if unknown:
        p.error(f"unknown target or scenario: {', '.join(unknown)}")
    scenarios = [s for s in SCENARIOS if s.name in scenario_names]
    settle = 5.0 if ns.quick else 10.0

    # Servers and the bench each need many descriptors: children inherit this.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    started = time.monotonic()
    load_before = os.getloadavg()[0]
    if load_before > 0.5:
        print(f"compare: WARNING: load average is {load_before:.2f} before starting; other "
              "work on this machine will skew the numbers", file=sys.stderr)
    work = Path(tempfile.mkdtemp(prefix="rtchat-compare-"))
    print(f"compare: work directory {work}", file=sys.stderr)
    targets = [TARGETS[n](work) for n in names]
    status: dict[str, str] = {}
    results: dict[str, dict[str, Any]] = {s.name: {} for s in scenarios}
    try:
        for t in targets:
            try:
                t.check()
                t.port = free_port()
                t.start_helpers()
                t.start_server()
                status[t.name] = "ok"
            except Unavailable as e:
                status[t.name] = f"skipped: {e}"
                t.stop()
            print(f"compare: {t.name}: {status[t.name]}", file=sys.stderr)
        live = [t for t in targets if status[t.name] == "ok"]
        for i, scenario in enumerate(scenarios):
            args = scenario.quick if ns.quick else scenario.full
            order = live[i % len(live):] + live[:i % len(live)] if live else []
            for t in order:
                estimate = estimate_seconds(args, settle)
                if time.monotonic() - started + estimate > ns.budget_seconds:
                    results[scenario.name][t.name] = {"error": "skipped: time budget"}
                    continue
                print(f"compare: {scenario.name} -> {t.name}", file=sys.stderr)
                log = t.work / f"bench-{scenario.name}.log"
                try:
                    t.restart()
                    command = bench_command(t, args, settle)
                    timeout = run_timeout(args, settle)
                    if scenario.idle:
                        report = run_idle(t, command, timeout, log)
                    else:
                        report = run_load(t, command, timeout, log)
                except (Unavailable, RuntimeError, subprocess.TimeoutExpired, ValueError) as e:
                    report = {"error": str(e)[:300]}
                results[scenario.name][t.name] = report
                print(f"compare:   {_summary(report)}", file=sys.stderr)
    finally:
        for t in targets:
            t.stop()
    out_path = Path(ns.json or Path(tempfile.gettempdir()) /
                    f"rtchat-compare-{time.strftime('%Y%m%d-%H%M%S')}.json")
    document = {
        "quick": ns.quick, "seconds": round(time.monotonic() - started, 1),
        "machine": {"cores": os.cpu_count(), "python": sys.version.split()[0],
                    "load_average_before": round(load_before, 2)},
        "targets": status, "results": results,
    }
    out_path.write_text(json.dumps(document, indent=2) + "\n")
    print(markdown(scenarios, names, status, results, ns.quick, time.monotonic() - started,
                   load_before, os.getloadavg()[0]))
    print(f"compare: raw results in {out_path}", file=sys.stderr)
    if not ns.keep:
        shutil.rmtree(work, ignore_errors=True)
    else:
        print(f"compare: kept {work}", file=sys.stderr)
    return 0


def _summary(report: dict[str, Any]) -> str:
    if "error" in report:
        return f"error: {report['error']}"
    if "server_kib_per_stream" in report:
        return (f"{report['connected']} streams, {report['server_kib_per_stream']} KiB/stream, "
                f"connect {report['connect_seconds']}s")
    return (f"sent {report['sent']} acked {report['acked']} delivered {report['delivered']}/"
            f"{report['expected']} p50 {report['latency_ms']['p50']} p99 "
            f"{report['latency_ms']['p99']} ms, {report['deliveries_per_second']}/s, "
            f"bench cpu {report['cpu_percent']}%")


def markdown(scenarios: list[Scenario], names: list[str], status: dict[str, str],
             results: dict[str, dict[str, Any]], quick: bool, seconds: float,
             load_before: float, load_after: float) -> str:
    lines = [f"### rtchat vs peers ({'quick' if quick else 'full'} run, "
             f"{os.cpu_count()} cores, {seconds / 60:.1f} min, "
             f"load average {load_before:.2f} before / {load_after:.2f} after)", "",
             "| scenario | metric | " + " | ".join(names) + " |",
             "|---|---|" + "---|" * len(names)]
    for s in scenarios:
        rows = IDLE_ROWS if s.idle else s.rows
        for j, (label, cell) in enumerate(rows):
            cells = []
            for n in names:
                r = results[s.name].get(n)
                if status.get(n, "").startswith("skipped"):
                    cells.append("n/a")
                elif r is None:
                    cells.append("—")
                elif "error" in r:
                    cells.append("error" if not r["error"].startswith("skipped") else "skipped")
                else:
                    try:
                        cells.append(cell(r))
                    except (KeyError, TypeError):
                        cells.append("—")
            title = s.title(quick) if j == 0 else ""
            lines.append(f"| {title} | {label} | " + " | ".join(cells) + " |")
    notes = [f"- {n}: {st}" for n, st in status.items() if st != "ok"]
    errors = [f"- {s}/{n}: {r['error']}" for s, per in results.items() for n, r in per.items()
              if "error" in r]
    if notes or errors:
        lines += ["", *notes, *errors]
    lines += ["", "Latency is publish (POST start) to delivery at the client; \"lost\" counts "
              "acknowledged messages a connected stream never got before the settle deadline; "
              "\"sends done/s\" below the scenario's rate means the server could not take "
              "messages that fast (sends stop 10 s past the planned time: \"unsent\"); "
              "CPU is % of one core while sending and settling (bench / server processes incl. "
              "their Redis): a bench near 100% means the client, not the server, set the pace."]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
