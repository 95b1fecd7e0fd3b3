"""The shipped conf/ files, with only their ports and paths replaced, for tests.

Owns the substitution contract each file documents in its header comment:
a test runs exactly the shipped text except for these literals. Every
literal must appear exactly as often as expected, so an edit that renames
one fails here, loudly, instead of a test silently running another config.
Pure: reads files, returns text; starts nothing.
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "conf"


def substitute(text: str, replacements: list[tuple[str, str, int]], name: str) -> str:
    """Replace each ``(literal, value, expected_count)`` outside ``#`` comment lines.

    Fails when a literal's count differs from the expected one.
    """
    lines = text.splitlines(keepends=True)
    for literal, value, count in replacements:
        found = sum(line.count(literal) for line in lines if not line.lstrip().startswith("#"))
        if found != count:
            raise AssertionError(
                f"{name}: expected {literal!r} {count} time(s), found {found}; "
                f"keep the literals its header comment lists")
        lines = [line if line.lstrip().startswith("#") else line.replace(literal, value)
                 for line in lines]
    return "".join(lines)


NGINX_PER_ADDRESS = "limit_conn rtchat_per_address 200;"


def nginx_conf(listen_port: int, node_ports: tuple[int, int], workdir: Path,
               connections_per_address: int = 200) -> str:
    """conf/nginx.conf listening on 127.0.0.1:``listen_port`` in front of two local nodes.

    Load tests raise ``connections_per_address``: all their clients are 127.0.0.1.
    """
    port_a, port_b = node_ports
    return substitute((CONF / "nginx.conf").read_text(), [
        (NGINX_PER_ADDRESS, f"limit_conn rtchat_per_address {connections_per_address};", 1),
        ("listen 80;", f"listen 127.0.0.1:{listen_port};", 1),
        ("server rtchat-a:8888", f"server 127.0.0.1:{port_a}", 1),
        ("server rtchat-b:8888", f"server 127.0.0.1:{port_b}", 1),
        ("/var/run/nginx.pid", f"{workdir}/nginx.pid", 1),
        ("/var/cache/nginx/", f"{workdir}/", 5),
    ], "conf/nginx.conf")


def haproxy_cfg(listen_port: int, node_ports: tuple[int, int]) -> str:
    """conf/haproxy.cfg listening on 127.0.0.1:``listen_port`` in front of two local nodes."""
    port_a, port_b = node_ports
    return substitute((CONF / "haproxy.cfg").read_text(), [
        ("bind :80", f"bind 127.0.0.1:{listen_port}", 1),
        ("server rtchat-a rtchat-a:8888", f"server rtchat-a 127.0.0.1:{port_a}", 1),
        ("server rtchat-b rtchat-b:8888", f"server rtchat-b 127.0.0.1:{port_b}", 1),
    ], "conf/haproxy.cfg")


def redis_args(role: str, port: int, datadir: Path, master_port: int | None = None) -> list[str]:
    """``redis-server`` arguments running conf/master.conf or conf/replica.conf locally.

    Command-line options override the file: only the address, port, data
    directory and (for a replica) the master's address change.
    """
    conf = CONF / ("master.conf" if role == "master" else "replica.conf")
    args = [str(conf), "--bind", "127.0.0.1", "--port", str(port), "--dir", str(datadir)]
    if role == "replica":
        if master_port is None:
            raise ValueError("a replica needs master_port")
        args += ["--replicaof", "127.0.0.1", str(master_port)]
    return args
