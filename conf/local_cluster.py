#!/usr/bin/env python3
"""A whole rtchat cluster on one machine, without Docker, from the shipped conf/ files.

Starts a Redis master, two replicas, a Sentinel, two rtchat nodes and nginx
in front of them, on free loopback ports (or the ones given), prints the
URLs, and stops every process it started:

    python conf/local_cluster.py start              # foreground: Ctrl-C stops it all
    python conf/local_cluster.py start --detach     # leave it running, then later:
    python conf/local_cluster.py stop

Needs redis-server and nginx on PATH (or /usr/sbin), and a Python with
rtchat installed (the one running this script: ``pip install -e .``).

Every process runs the shipped file with only its address, port and paths
changed: conf/master.conf and conf/replica.conf through redis-server's
command-line overrides; a copy of conf/sentinel.conf (Sentinel rewrites it)
and of conf/nginx.conf with their literals replaced (each must appear as
often as expected, or this script stops rather than run another config);
conf/cluster-node.yaml with RTCHAT_* environment overrides, as compose does.
The nodes find the master through Sentinel, which here is one, so its
quorum is 1. The run directory (default: $TMPDIR/rtchat-local-cluster-<uid>,
or --run-dir) holds each process's data and log, ``pids.json`` (what
``stop`` signals, each PID checked against the program it started) and
``cluster.json`` (ports and URLs). It never touches anything it did not
start: not a Redis on 6379, not another cluster's run directory.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

CONF = Path(__file__).resolve().parent
SERVICE = "mymaster"
NAMES = ("master", "replica-1", "replica-2", "sentinel", "node-a", "node-b", "nginx")


class Failed(Exception):
    """Something could not start or be found; the message says what."""


def default_run_dir() -> Path:
    return Path(tempfile.gettempdir()) / f"rtchat-local-cluster-{os.getuid()}"


def tool(name: str) -> str:
    path = shutil.which(name) or next(
        (p for p in (f"/usr/sbin/{name}", f"/usr/bin/{name}") if os.path.exists(p)), None)
    if path is None:
        raise Failed(f"{name} is not installed (Debian/Ubuntu: apt-get install {name})")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_in_use(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def substitute(text: str, replacements: list[tuple[str, str, int]], name: str) -> str:
    """Replace each ``(literal, value, count)`` outside comment lines; the count must match."""
    lines = text.splitlines(keepends=True)
    for literal, value, count in replacements:
        found = sum(line.count(literal) for line in lines if not line.lstrip().startswith("#"))
        if found != count:
            raise Failed(f"{name}: expected {literal!r} {count} time(s), found {found}")
        lines = [line if line.lstrip().startswith("#") else line.replace(literal, value)
                 for line in lines]
    return "".join(lines)


def wait_for(check, what: str, timeout: float, procs: dict[str, subprocess.Popen]) -> None:
    deadline = time.monotonic() + timeout
    while True:
        for name, proc in procs.items():
            if proc.poll() is not None:
                raise Failed(f"{name} exited with {proc.returncode} while waiting for {what}")
        try:
            if check():
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise Failed(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.05)


def redis_says(port: int, *command: str) -> str:
    """One command to a Redis server, over a plain socket; the raw reply as text."""
    request = f"*{len(command)}\r\n" + "".join(f"${len(c)}\r\n{c}\r\n" for c in command)
    data = b""
    with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
        s.sendall(request.encode())
        try:
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
                s.settimeout(0.1)  # the rest of a reply follows at once; then it is quiet
        except TimeoutError:
            pass
    return data.decode(errors="replace")


def http_status(url: str) -> int:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=2) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return 0


class Cluster:
    def __init__(self, run_dir: Path) -> None:
        self.run = run_dir
        self.procs: dict[str, subprocess.Popen] = {}
        self.argv0: dict[str, str] = {}

    def spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None,
              cwd: Path | None = None) -> subprocess.Popen:
        log = open(self.run / f"{name}.log", "ab")  # noqa: SIM115 - the child keeps it
        try:
            # A session of its own: a Ctrl-C at the terminal reaches this script only, which
            # then stops everything in order.
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                    env=env, cwd=cwd, start_new_session=True)
        finally:
            log.close()
        self.procs[name] = proc
        self.argv0[name] = os.path.realpath(argv[0])
        self.save_pids()
        return proc

    def save_pids(self) -> None:
        pids = [{"name": n, "pid": p.pid, "program": self.argv0[n], "started": start_time(p.pid)}
                for n, p in self.procs.items()]
        (self.run / "pids.json").write_text(json.dumps(pids, indent=1) + "\n")

    def start(self, ports: dict[str, int], admin_password: str | None) -> dict:
        redis_server, nginx = tool("redis-server"), tool("nginx")
        run = self.run
        p = ports
        for role, name in (("master", "master"), ("replica", "replica-1"),
                           ("replica", "replica-2")):
            data = run / name
            data.mkdir()
            argv = [redis_server, str(CONF / f"{role}.conf"), "--bind", "127.0.0.1",
                    "--port", str(p[name]), "--dir", str(data)]
            if role == "replica":
                argv += ["--replicaof", "127.0.0.1", str(p["master"])]
            self.spawn(name, argv)
            if role == "master":
                wait_for(lambda: "PONG" in redis_says(p["master"], "PING"), "the Redis master",
                         15, self.procs)
        for name in ("replica-1", "replica-2"):
            port = p[name]
            wait_for(lambda port=port: "master_link_status:up" in redis_says(
                port, "INFO", "replication"), f"{name} to sync", 30, self.procs)

        sentinel_dir = run / "sentinel"
        sentinel_dir.mkdir()
        sentinel_conf = sentinel_dir / "sentinel.conf"
        sentinel_conf.write_text(substitute((CONF / "sentinel.conf").read_text(), [
            ("port 26379", f"port {p['sentinel']}\nbind 127.0.0.1", 1),
            ("dir /tmp", f"dir {sentinel_dir}", 1),
            (f"sentinel monitor {SERVICE} redis-master 6379 2",
             f"sentinel monitor {SERVICE} 127.0.0.1 {p['master']} 1", 1),
        ], "conf/sentinel.conf"))
        self.spawn("sentinel", [redis_server, str(sentinel_conf), "--sentinel"])
        wait_for(lambda: f"{p['master']}" in redis_says(
            p["sentinel"], "SENTINEL", "GET-MASTER-ADDR-BY-NAME", SERVICE),
            "Sentinel to watch the master", 15, self.procs)

        master = f"redis://127.0.0.1:{p['master']}/0"
        replicas = [f"redis://127.0.0.1:{p[n]}/0" for n in ("replica-1", "replica-2")]
        base_env = {k: v for k, v in os.environ.items() if not k.startswith("RTCHAT_")}
        base_env.update({
            "RTCHAT_HTTP__HOST": "127.0.0.1",
            "RTCHAT_BROKER__REDIS__MASTER": master,
            "RTCHAT_BROKER__REDIS__REPLICAS": "[" + ", ".join(replicas) + "]",
            "RTCHAT_BROKER__REDIS__SENTINEL__HOSTS": f"[127.0.0.1:{p['sentinel']}]",
            "RTCHAT_BROKER__REDIS__SENTINEL__SERVICE": SERVICE,
            "RTCHAT_LOGGING__FORMAT": "text",
            # A local cluster stops in seconds, not the production drain's ten.
            "RTCHAT_SHUTDOWN__DRAIN_SECONDS": "2",
        })
        if admin_password:
            base_env["RTCHAT_ADMIN__PASSWORD"] = admin_password
        for name in ("node-a", "node-b"):
            env = {**base_env, "RTCHAT_NODE__ID": f"local-{name[-1]}",
                   "RTCHAT_HTTP__PORT": str(p[name])}
            self.spawn(name, [sys.executable, "-m", "rtchat", "--config",
                              str(CONF / "cluster-node.yaml")], env=env, cwd=CONF.parent)
        for name in ("node-a", "node-b"):
            url = f"http://127.0.0.1:{p[name]}/readyz"
            wait_for(lambda url=url: http_status(url) == 200, f"{name} to be ready", 30,
                     self.procs)

        nginx_dir = run / "nginx"
        nginx_dir.mkdir()
        nginx_conf = nginx_dir / "nginx.conf"
        nginx_conf.write_text(substitute((CONF / "nginx.conf").read_text(), [
            ("listen 80;", f"listen 127.0.0.1:{p['nginx']};", 1),
            ("server rtchat-a:8888", f"server 127.0.0.1:{p['node-a']}", 1),
            ("server rtchat-b:8888", f"server 127.0.0.1:{p['node-b']}", 1),
            ("/var/run/nginx.pid", f"{nginx_dir}/nginx.pid", 1),
            ("/var/cache/nginx/", f"{nginx_dir}/", 5),
        ], "conf/nginx.conf"))
        self.spawn("nginx", [nginx, "-p", str(nginx_dir), "-e", "stderr", "-c", str(nginx_conf),
                             "-g", "daemon off;"])
        chat = f"http://127.0.0.1:{p['nginx']}"
        wait_for(lambda: http_status(chat + "/healthz") == 200, "nginx to pass requests", 15,
                 self.procs)
        info = {
            "run_dir": str(run), "ports": p, "chat": chat + "/",
            "admin": {n: f"http://127.0.0.1:{p[n]}/admin" for n in ("node-a", "node-b")},
            "redis": {"master": master, "replicas": replicas,
                      "sentinel": f"127.0.0.1:{p['sentinel']}"},
            "pids": {n: proc.pid for n, proc in self.procs.items()},
        }
        (run / "cluster.json").write_text(json.dumps(info, indent=1) + "\n")
        return info


def stop(run_dir: Path, timeout: float = 15.0) -> int:
    """Stop every process listed in ``pids.json``, newest first; returns how many were running."""
    pid_file = run_dir / "pids.json"
    if not pid_file.is_file():
        print(f"nothing to stop: no {pid_file}", file=sys.stderr)
        return 0
    entries = json.loads(pid_file.read_text())
    stopped = 0
    for entry in reversed(entries):
        pid, program, started = int(entry["pid"]), str(entry["program"]), entry.get("started")
        if not started_by_us(pid, program, started):
            continue
        stopped += 1
        with _suppress_gone():
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while started_by_us(pid, program, started) and time.monotonic() < deadline:
            time.sleep(0.05)
        if started_by_us(pid, program, started):
            print(f"{entry['name']} (pid {pid}) outlived SIGTERM; SIGKILL", file=sys.stderr)
            with _suppress_gone():
                os.kill(pid, signal.SIGKILL)
        print(f"stopped {entry['name']} (pid {pid})")
    pid_file.unlink()
    return stopped


class _suppress_gone:
    def __enter__(self) -> None:
        return None

    def __exit__(self, typ, value, tb) -> bool:
        return typ is ProcessLookupError


def start_time(pid: int) -> str | None:
    """The process's start time (in clock ticks since boot), which a reused PID cannot share."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[19]
    except (OSError, IndexError):
        return None


def started_by_us(pid: int, program: str, started: str | None) -> bool:
    """The PID is alive (not a zombie) and is the very process we started: the same program
    (``/proc/<pid>/exe``; process titles change) and the same start time."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
        exe = os.path.realpath(os.readlink(f"/proc/{pid}/exe"))
    except OSError:
        return False
    return state != "Z" and exe == program and (started is None or start_time(pid) == started)


def choose_ports(base: int | None, nginx_port: int | None) -> dict[str, int]:
    if base is not None:
        ports = {name: base + i for i, name in enumerate(NAMES)}
    else:
        ports = {name: free_port() for name in NAMES}
    if nginx_port is not None:
        ports["nginx"] = nginx_port
    if len(set(ports.values())) != len(ports):
        raise Failed(f"ports overlap: {ports}")
    for name, port in ports.items():
        if not 1 <= port <= 65535:
            raise Failed(f"{name}: port {port} is not 1-65535")
        if port_in_use(port):
            raise Failed(f"{name}: port {port} is in use (give other ports, or none)")
    return ports


def print_urls(info: dict) -> None:
    p = info["ports"]
    print(f"""rtchat cluster on one machine (run dir {info['run_dir']})
  chat, through nginx:  {info['chat']}
  admin, node a:        {info['admin']['node-a']}
  admin, node b:        {info['admin']['node-b']}
  redis master:         {info['redis']['master']}
  redis replicas:       {', '.join(info['redis']['replicas'])}
  sentinel:             {info['redis']['sentinel']} (service {SERVICE})
  logs:                 {info['run_dir']}/<name>.log  (nodes on :{p['node-a']} and :{p['node-b']})""",
          flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="local_cluster.py", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    start_p = sub.add_parser("start", help="start the cluster (Ctrl-C stops it)")
    start_p.add_argument("--run-dir", type=Path, default=default_run_dir())
    start_p.add_argument("--port", type=int, help="nginx's port (default: a free one)")
    start_p.add_argument("--base-port", type=int,
                         help="use 7 ports from this one: master, replica-1, replica-2, "
                              "sentinel, node-a, node-b, nginx (default: free ones)")
    start_p.add_argument("--admin-password",
                         help="admin password for both nodes (default: none, so admin "
                              "answers only to direct loopback requests, not through nginx)")
    start_p.add_argument("--detach", action="store_true",
                         help="leave the cluster running and return; stop it with 'stop'")
    stop_p = sub.add_parser("stop", help="stop every process a detached 'start' left running")
    stop_p.add_argument("--run-dir", type=Path, default=default_run_dir())
    args = parser.parse_args(argv)

    if args.command == "stop":
        stop(args.run_dir)
        return 0
    run_dir: Path = args.run_dir
    if (run_dir / "pids.json").exists():
        print(f"{run_dir} holds a running cluster's pids.json: stop it first "
              f"(python {sys.argv[0]} stop --run-dir {run_dir})", file=sys.stderr)
        return 2
    try:
        __import__("rtchat")
    except ImportError:
        print(f"{sys.executable} cannot import rtchat: pip install -e . first", file=sys.stderr)
        return 2
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    cluster = Cluster(run_dir)
    stopping = []

    def on_signal(signum, frame) -> None:
        stopping.append(signum)
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    try:
        ports = choose_ports(args.base_port, args.port)
        info = cluster.start(ports, args.admin_password)
        print_urls(info)
        if args.detach:
            print(f"detached; stop with: python {sys.argv[0]} stop --run-dir {run_dir}")
            return 0
        print("Ctrl-C stops every process above.", flush=True)
        while True:
            signal.pause()
    except Failed as e:
        print(f"local cluster: {e}", file=sys.stderr)
        stop(run_dir)
        return 1
    except KeyboardInterrupt:
        print("\nstopping...", flush=True)
        stop(run_dir)
        return 0


if __name__ == "__main__":
    sys.exit(main())
