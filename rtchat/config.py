"""Configuration: frozen dataclasses, loaded from YAML, the environment and flags.

Owns: the schema (every key, its type, its default and its limits), the
merge order (flags > environment > file > defaults) and the error messages,
which always name the dotted key path. It is the only module that imports
yaml. It knows nothing of tornado, redis or the hub.

It is one job, and over 500 lines only because the schema is every key of
every section: splitting the dataclasses from their checks and loader would
put one key's type, default and limit in two files.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import os
import re
import socket
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import parse_qs, urlsplit

import yaml

ENV_PREFIX = "RTCHAT_"
CONFIG_ENV = "RTCHAT_CONFIG"


class ConfigError(Exception):
    """A user error in the configuration; ``str()`` is ``"<key.path>: <reason>"``."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}" if path else reason)
        self.path = path
        self.reason = reason


@dataclass(frozen=True)
class NodeConfig:
    id: str = "auto"


@dataclass(frozen=True)
class HttpConfig:
    host: str = "0.0.0.0"
    port: int = 8888
    xheaders: bool = False
    allowed_origins: tuple[str, ...] = ()
    # Peers whose forwarding headers are believed (CIDRs). Empty with xheaders on = loopback only.
    trusted_proxies: tuple[str, ...] = ()
    # Host header values served (compared without the port); empty = any.
    allowed_hosts: tuple[str, ...] = ()
    frame_ancestors: str = "'self'"
    header_timeout_seconds: float = 10.0
    body_timeout_seconds: float = 30.0
    idle_timeout_seconds: float = 60.0
    max_header_bytes: int = 32768


@dataclass(frozen=True)
class SentinelConfig:
    hosts: tuple[str, ...] = ()
    service: str = "mymaster"
    password: str | None = None


@dataclass(frozen=True)
class RedisClusterConfig:
    # Seed nodes of a Redis Cluster (any reachable one tells the whole layout).
    nodes: tuple[str, ...] = ()


@dataclass(frozen=True)
class RedisConfig:
    master: str = "redis://127.0.0.1:6379/0"
    replicas: tuple[str, ...] = ()
    sentinel: SentinelConfig | None = None
    cluster: RedisClusterConfig | None = None  # Redis Cluster mode; then ``master`` is ignored
    subscribe_from: Literal["replica", "master"] = "replica"
    max_replica_lag_seconds: float = 5.0
    replica_ack_timeout_ms: int = 50
    health_interval_seconds: float = 1.0
    key_prefix: str = "rtchat:"


@dataclass(frozen=True)
class BrokerConfig:
    backend: Literal["memory", "redis"] = "memory"
    redis: RedisConfig = field(default_factory=RedisConfig)


@dataclass(frozen=True)
class HistoryConfig:
    size: int = 1000
    ttl_seconds: int = 86400
    # How long an idempotency key answers with its first message (from the first answer).
    dedup_seconds: int = 300


@dataclass(frozen=True)
class SseConfig:
    heartbeat_seconds: float = 15.0
    retry_ms: int = 2000
    max_queue: int = 1000
    max_buffer_bytes: int = 262144
    write_timeout_seconds: float = 30.0


@dataclass(frozen=True)
class RateConfig:
    messages_per_second: float = 5.0
    burst: int = 20


@dataclass(frozen=True)
class ReadRateConfig:
    requests_per_second: float = 20.0
    burst: int = 60


@dataclass(frozen=True)
class LimitsConfig:
    max_message_bytes: int = 4096
    max_body_bytes: int = 16384
    max_nick_chars: int = 32
    max_clients: int = 20000
    max_rooms_per_stream: int = 32
    max_streams_per_address: int = 100
    max_connections_per_address: int = 200
    rate: RateConfig = field(default_factory=RateConfig)
    read_rate: ReadRateConfig = field(default_factory=ReadRateConfig)


@dataclass(frozen=True)
class AdminConfig:
    enabled: bool = True
    username: str = "admin"
    password: str | None = None
    # scrypt hash made by `rtchat hash-password`, accepted instead of a plain password.
    password_hash: str | None = None


@dataclass(frozen=True)
class JwtConfig:
    algorithms: tuple[str, ...] = ("HS256",)
    secret: str | None = None
    public_key_file: str | None = None
    jwks_file: str | None = None
    issuer: str | None = None
    audience: str | None = None
    leeway_seconds: float = 30.0


@dataclass(frozen=True)
class HeaderAuthConfig:
    user: str = "X-Forwarded-User"
    name: str = "X-Forwarded-Preferred-Username"


@dataclass(frozen=True)
class AuthConfig:
    mode: Literal["anonymous", "jwt", "header"] = "anonymous"
    jwt: JwtConfig = field(default_factory=JwtConfig)
    header: HeaderAuthConfig = field(default_factory=HeaderAuthConfig)


@dataclass(frozen=True)
class ShutdownConfig:
    drain_seconds: float = 10.0


@dataclass(frozen=True)
class LoggingConfig:
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["text", "json"] = "text"


@dataclass(frozen=True)
class Config:
    node: NodeConfig = field(default_factory=NodeConfig)
    http: HttpConfig = field(default_factory=HttpConfig)
    broker: BrokerConfig = field(default_factory=BrokerConfig)
    history: HistoryConfig = field(default_factory=HistoryConfig)
    sse: SseConfig = field(default_factory=SseConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    admin: AdminConfig = field(default_factory=AdminConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    shutdown: ShutdownConfig = field(default_factory=ShutdownConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    @property
    def node_id(self) -> str:
        """The node id, with ``auto`` resolved to ``hostname-pid``."""
        if self.node.id == "auto":
            return f"{socket.gethostname()}-{os.getpid()}"
        return self.node.id


# Checks on values beyond their type: (predicate, reason) per dotted key.
_POSITIVE = (lambda v: v > 0, "must be greater than 0")
_NON_NEGATIVE = (lambda v: v >= 0, "must be 0 or more")


def redis_url_problem(url: str) -> str | None:
    """What is wrong with a Redis URL, checked whole (scheme, host, port, db); None if fine."""
    try:
        parts = urlsplit(url)
    except ValueError as e:
        return f"not a URL ({e})"
    if parts.scheme not in ("redis", "rediss", "unix"):
        return "must be a redis:// (or rediss://, unix://) URL"
    if parts.scheme == "unix":
        if not parts.path:
            return "a unix:// URL needs a socket path (unix:///run/redis.sock)"
        dbs = parse_qs(parts.query).get("db", ["0"])
        return None if dbs[-1].isdigit() else f"db must be a number, not {dbs[-1]!r}"
    try:
        port = parts.port
    except ValueError:
        return f"port must be a number from 1 to 65535, not {parts.netloc.rpartition(':')[2]!r}"
    if not parts.hostname:
        return "has no host (redis://HOST:PORT/DB)"
    if port is not None and not 1 <= port <= 65535:
        return f"port must be from 1 to 65535, not {port}"
    if parts.netloc.endswith(":"):
        return "has a ':' but no port"
    db = parts.path.lstrip("/")
    if db and not db.isdigit():
        return f"db must be a number (redis://host:port/0), not {db!r}"
    return None


def _check_redis_urls(value: Any) -> str | None:
    urls = [value] if isinstance(value, str) else list(value)
    for url in urls:
        problem = redis_url_problem(url)
        if problem is not None:
            return f"{mask_url(url)}: {problem}" if len(urls) > 1 else problem
    return None

_CHECKS: dict[str, tuple[typing.Callable[[Any], bool], str]] = {
    "node.id": (lambda v: re.fullmatch(r"[A-Za-z0-9_.:-]{1,64}", v) is not None,
                "must be 'auto' or 1-64 characters of letters, digits, '_.:-'"),
    "http.port": (lambda v: 0 <= v <= 65535, "must be a TCP port, 0-65535"),
    "http.allowed_origins": (
        lambda v: all(re.fullmatch(r"https?://[^/\s]+", o) for o in v),
        "every entry must be an origin like https://chat.example.com",
    ),
    "http.trusted_proxies": (lambda v: all(_is_network(n) for n in v),
                             "every entry must be an IP address or CIDR network, like 10.0.0.0/8"),
    "http.allowed_hosts": (lambda v: all(re.fullmatch(r"[A-Za-z0-9.\-\[\]:*]+", h) for h in v),
                           "every entry must be a host name or address, without a port"),
    "http.frame_ancestors": (lambda v: re.fullmatch(r"[^;,\r\n]+", v) is not None,
                             "must be CSP frame-ancestors sources, e.g. 'self' or 'none'"),
    "http.header_timeout_seconds": _POSITIVE,
    "http.body_timeout_seconds": _POSITIVE,
    "http.idle_timeout_seconds": _POSITIVE,
    "http.max_header_bytes": (lambda v: v >= 1024, "must be at least 1024"),
    "broker.redis.cluster.nodes": (lambda v: len(v) > 0, "must list at least one redis:// URL"),
    "broker.redis.sentinel.hosts": (
        lambda v: len(v) > 0 and all(re.fullmatch(r"[^:\s]+:\d+", h)
                                     and 1 <= int(h.rpartition(":")[2]) <= 65535 for h in v),
        "must list at least one host:port (port 1-65535)",
    ),
    "broker.redis.max_replica_lag_seconds": _POSITIVE,
    "broker.redis.replica_ack_timeout_ms": _NON_NEGATIVE,
    "broker.redis.health_interval_seconds": _POSITIVE,
    "history.size": _POSITIVE,
    "history.ttl_seconds": _POSITIVE,
    "history.dedup_seconds": _POSITIVE,
    "sse.heartbeat_seconds": _POSITIVE,
    "sse.retry_ms": _POSITIVE,
    "sse.max_queue": _POSITIVE,
    "sse.max_buffer_bytes": (lambda v: v >= 4096, "must be at least 4096"),
    "sse.write_timeout_seconds": _POSITIVE,
    "limits.max_message_bytes": _POSITIVE,
    "limits.max_body_bytes": _POSITIVE,
    "limits.max_nick_chars": _POSITIVE,
    "limits.max_clients": _POSITIVE,
    "limits.rate.messages_per_second": _POSITIVE,
    "limits.rate.burst": _POSITIVE,
    "limits.max_streams_per_address": _POSITIVE,
    "limits.max_rooms_per_stream": (lambda v: 1 <= v <= 64, "must be from 1 to 64"),
    "limits.max_connections_per_address": _POSITIVE,
    "limits.read_rate.requests_per_second": _POSITIVE,
    "limits.read_rate.burst": _POSITIVE,
    "admin.password_hash": (lambda v: v.startswith("scrypt$") and v.count("$") == 5,
                            "must be a hash made by 'rtchat hash-password' (scrypt$...)"),
    "admin.username": (lambda v: v != "" and ":" not in v, "must be non-empty without ':'"),
    "shutdown.drain_seconds": _NON_NEGATIVE,
    "auth.jwt.algorithms": (
        lambda v: len(v) > 0 and (set(v) <= {"HS256", "HS384", "HS512"} or set(v) <= {
            "RS256", "RS384", "RS512", "ES256", "ES384", "ES512", "EdDSA"}),
        "must list HS256/384/512, or RS256/384/512, ES256/384/512, EdDSA: one family, never "
        "both (a key read both ways lets an HS token pass as signed by the public key)"),
    "auth.jwt.leeway_seconds": _NON_NEGATIVE,
    "auth.header.user": (lambda v: re.fullmatch(r"[A-Za-z0-9-]+", v) is not None,
                         "must be a header name"),
    "auth.header.name": (lambda v: re.fullmatch(r"[A-Za-z0-9-]+", v) is not None,
                         "must be a header name"),
}

# Every Redis URL in the config, checked whole by ``redis_url_problem``.
_URL_KEYS = {"broker.redis.master", "broker.redis.replicas", "broker.redis.cluster.nodes"}

_SECRETS = {"admin.password", "admin.password_hash", "broker.redis.sentinel.password",
            "auth.jwt.secret"}


def _is_network(value: str) -> bool:
    try:
        ipaddress.ip_network(value, strict=False)
    except ValueError:
        return False
    return True


def load(
    path: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Build the effective config: defaults < file < environment < overrides.

    ``overrides`` maps dotted keys (``"http.port"``) to values, as the command
    line gives them. Raises :class:`ConfigError` naming the key on any problem.
    """
    data: dict[str, Any] = {}
    if path is not None:
        data = _read_file(path)
    for key, raw in _env_items(environ if environ is not None else os.environ):
        _set_dotted(data, key, _env_value(key, raw))
    for key, value in (overrides or {}).items():
        _set_dotted(data, key, value)
    return _build(Config, data, "")


def _read_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except OSError as e:
        raise ConfigError("", f"cannot read config file {os.fspath(path)!r}: {e.strerror}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError("", f"{os.fspath(path)}: not valid YAML{where}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError("", f"{os.fspath(path)}: the top level must be a mapping of sections")
    return data


def _env_items(environ: Mapping[str, str]) -> list[tuple[str, str]]:
    """Every ``RTCHAT_*`` variable as ``(dotted key, raw value)``.

    A variable that names no setting (``RTCHAT_ADMIN_PASSWORD`` with one
    underscore, a misspelled key) is an error, as an unknown YAML key is: a
    silently ignored password is worse than a refusal to start.
    ``RTCHAT_CONFIG`` (the config file's path) is the one exception.
    """
    items = []
    known = setting_names()
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX) or name == CONFIG_ENV:
            continue
        parts = name[len(ENV_PREFIX):].split("__")
        key = ".".join(part.lower() for part in parts)
        if key not in known:
            # A well-formed name is reported by its dotted key, as YAML is; any other by itself.
            where = key if len(parts) > 1 and all(parts) else name
            subject = "" if where == name else f"environment variable {name} "
            raise ConfigError(where, subject + _unknown_variable(name, known))
        items.append((key, raw))
    return sorted(items)


def setting_names() -> dict[str, str]:
    """Every dotted key a value can be given for, mapped to its environment variable name."""
    names: dict[str, str] = {}

    def walk(cls: type, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            path = f"{prefix}.{f.name}" if prefix else f.name
            tp = hints[f.name]
            inner = [a for a in typing.get_args(tp) if a is not type(None)]
            target = inner[0] if typing.get_origin(tp) in (typing.Union, types.UnionType) else tp
            if dataclasses.is_dataclass(target):
                if target is not tp:  # optional section (sentinel: null) can be set whole
                    names[path] = ENV_PREFIX + path.upper().replace(".", "__")
                walk(target, path)
            else:
                names[path] = ENV_PREFIX + path.upper().replace(".", "__")

    walk(Config, "")
    return names


def _unknown_variable(name: str, known: Mapping[str, str]) -> str:
    close = difflib.get_close_matches(name, list(known.values()), n=1, cutoff=0.75)
    hint = f"; did you mean {close[0]}?" if close else ""
    return (f"names no setting{hint} (settings are "
            f"{ENV_PREFIX}<SECTION>__<KEY>, e.g. RTCHAT_HTTP__PORT; {CONFIG_ENV} names the file)")


def _env_value(key: str, raw: str) -> Any:
    """Read an environment value as a YAML scalar or flow list."""
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        raise ConfigError(key, f"cannot read environment value {raw!r}") from None
    if isinstance(value, dict):
        raise ConfigError(key, "environment values must be scalars or flow lists")
    return value


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            raise ConfigError(".".join(parts[: i + 1]), "must be a mapping")
        node = child
    node[parts[-1]] = value


def _build(cls: type, data: Any, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(prefix, f"must be a mapping, not {_type_name(data)}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            where = f"{prefix}.{key}" if prefix else str(key)
            raise ConfigError(where, f"unknown key (known: {', '.join(sorted(names))})")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        path = f"{prefix}.{f.name}" if prefix else f.name
        kwargs[f.name] = _convert(hints[f.name], data[f.name], path)
    return cls(**kwargs)


def _convert(tp: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _convert(inner, value, path)
    if dataclasses.is_dataclass(tp):
        return _build(tp, {} if value is None else value, path)
    if origin is Literal:
        if value not in args:
            raise ConfigError(path, f"must be one of {', '.join(map(str, args))}, not {value!r}")
        result = value
    elif origin is tuple:
        if not isinstance(value, list):
            raise ConfigError(path, f"must be a list, not {_type_name(value)}")
        for i, item in enumerate(value):
            if not isinstance(item, str):
                raise ConfigError(f"{path}[{i}]", f"must be a string, not {_type_name(item)}")
        result = tuple(value)
    elif tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(path, f"must be true or false, not {value!r}")
        result = value
    elif tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(path, f"must be an integer, not {_type_name(value)}")
        result = value
    elif tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(path, f"must be a number, not {_type_name(value)}")
        result = float(value)
    elif tp is str:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and path == "node.id":
            value = str(value)
        if not isinstance(value, str):
            raise ConfigError(path, f"must be a string, not {_type_name(value)}")
        result = value
    else:  # pragma: no cover - a schema bug, not a user error
        raise TypeError(f"unsupported config type {tp!r} at {path}")
    if path in _URL_KEYS:
        problem = _check_redis_urls(result)
        if problem is not None:
            raise ConfigError(path, f"{problem} (got {mask_url(str(result))!r})"
                              if isinstance(result, str) else problem)
    check = _CHECKS.get(path)
    if check is not None and not (path == "node.id" and result == "auto"):
        ok, reason = check
        if not ok(result):
            raise ConfigError(path, f"{reason} (got {result!r})")
    return result


def _type_name(value: Any) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean",
            int: "an integer", float: "a number", type(None): "null"}.get(type(value), type(value).__name__)


def as_dict(cfg: Config, mask_secrets: bool = True) -> dict[str, Any]:
    """The config as plain data (for ``check-config`` and the admin page); secrets masked."""

    def walk(obj: Any, prefix: str) -> Any:
        if dataclasses.is_dataclass(obj):
            return {f.name: walk(getattr(obj, f.name), f"{prefix}.{f.name}" if prefix else f.name)
                    for f in dataclasses.fields(obj)}
        if isinstance(obj, tuple):
            return [mask_url(v) if mask_secrets else v for v in obj]
        if mask_secrets and prefix in _SECRETS and obj is not None:
            return "********"
        if mask_secrets and isinstance(obj, str):
            return mask_url(obj)
        return obj

    return walk(cfg, "")


def mask_url(value: str) -> str:
    """Hide the password in a ``redis://user:pass@host`` URL; other strings pass through."""
    return re.sub(r"^(\w+://[^:/@]*:)[^@/]*@", r"\1********@", value)


def dump(cfg: Config) -> str:
    """The effective config as YAML, secrets masked."""
    return yaml.safe_dump(as_dict(cfg), sort_keys=False, default_flow_style=False)
