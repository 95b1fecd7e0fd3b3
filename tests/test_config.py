"""Configuration: file, environment, flags, and errors that name the key."""

import subprocess
import sys
from pathlib import Path

import pytest

from rtchat import config

ROOT = Path(__file__).resolve().parent.parent


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "rtchat.yaml"
    path.write_text(text)
    return path


def test_defaults_match_the_spec() -> None:
    cfg = config.load(None, {})
    assert cfg.broker.backend == "memory"
    assert cfg.http.port == 8888
    assert cfg.sse.retry_ms == 2000
    assert cfg.limits.rate.burst == 20
    assert cfg.broker.redis.replica_ack_timeout_ms == 50
    assert cfg.admin.password is None


def test_shipped_default_config_equals_the_built_in_defaults() -> None:
    assert config.load(ROOT / "conf" / "rtchat.yaml", {}) == config.Config()


def test_valid_file(tmp_path: Path) -> None:
    path = write(tmp_path, """
http: {port: 9001, allowed_origins: ["https://chat.example.com"]}
broker:
  backend: redis
  redis: {master: "redis://10.0.0.1:6379/0", replicas: ["redis://10.0.0.2:6379/0"]}
limits: {rate: {burst: 3}}
""")
    cfg = config.load(path, {})
    assert cfg.http.port == 9001
    assert cfg.http.allowed_origins == ("https://chat.example.com",)
    assert cfg.broker.redis.replicas == ("redis://10.0.0.2:6379/0",)
    assert cfg.limits.rate.burst == 3
    assert cfg.limits.rate.messages_per_second == 5.0  # untouched keys keep defaults


@pytest.mark.parametrize(("text", "key", "reason"), [
    ("http: {prot: 1}", "http.prot", "unknown key"),
    ("nosuch: {}", "nosuch", "unknown key"),
    ("http: {port: eighty}", "http.port", "must be an integer"),
    ("http: {port: 70000}", "http.port", "TCP port"),
    ("http: {xheaders: 'yes please'}", "http.xheaders", "true or false"),
    ("broker: {backend: kafka}", "broker.backend", "must be one of memory, redis"),
    ("broker: {redis: {replicas: redis://x}}", "broker.redis.replicas", "must be a list"),
    ("broker: {redis: {master: 'http://x'}}", "broker.redis.master", "redis:// "),
    ("sse: {max_queue: 0}", "sse.max_queue", "greater than 0"),
    ("limits: {rate: {burst: -1}}", "limits.rate.burst", "greater than 0"),
    ("limits: 5", "limits", "must be a mapping"),
])
def test_bad_values_name_the_key(tmp_path: Path, text: str, key: str, reason: str) -> None:
    with pytest.raises(config.ConfigError) as info:
        config.load(write(tmp_path, text), {})
    assert info.value.path == key
    assert reason in str(info.value)
    assert str(info.value).startswith(f"{key}: ")


def test_env_overrides_file_and_flags_override_env(tmp_path: Path) -> None:
    path = write(tmp_path, "http: {port: 9001}\nadmin: {password: fromfile}\n")
    env = {
        "RTCHAT_HTTP__PORT": "9002",
        "RTCHAT_BROKER__BACKEND": "redis",
        "RTCHAT_BROKER__REDIS__REPLICAS": "[redis://a:6380/0, redis://b:6380/0]",
        "RTCHAT_ADMIN__PASSWORD": "s3cret",
        "RTCHAT_SSE__HEARTBEAT_SECONDS": "2.5",
        "UNRELATED": "x",
    }
    cfg = config.load(path, env)
    assert cfg.http.port == 9002
    assert cfg.broker.backend == "redis"
    assert cfg.broker.redis.replicas == ("redis://a:6380/0", "redis://b:6380/0")
    assert cfg.admin.password == "s3cret"
    assert cfg.sse.heartbeat_seconds == 2.5
    assert config.load(path, env, {"http.port": 9003}).http.port == 9003


def test_env_errors_name_the_key() -> None:
    with pytest.raises(config.ConfigError) as info:
        config.load(None, {"RTCHAT_HTTP__PORT": "abc"})
    assert info.value.path == "http.port"
    with pytest.raises(config.ConfigError) as info:
        config.load(None, {"RTCHAT_HTTP__NOPE": "1"})
    assert info.value.path == "http.nope"


def test_unreadable_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(config.ConfigError, match="cannot read config file"):
        config.load(tmp_path / "missing.yaml", {})
    with pytest.raises(config.ConfigError, match="not valid YAML at line 3"):
        config.load(write(tmp_path, "http:\n  port: [1,\n"), {})


def test_secrets_are_masked_in_the_dump() -> None:
    cfg = config.load(None, {"RTCHAT_ADMIN__PASSWORD": "hunter2",
                             "RTCHAT_BROKER__REDIS__MASTER": "redis://:pw@db:6379/0"})
    text = config.dump(cfg)
    assert "hunter2" not in text and ":pw@" not in text
    assert "password: '********'" in text
    assert "redis://:********@db:6379/0" in text


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "rtchat", *args], capture_output=True, text=True,
                          timeout=30, env={"PATH": "/usr/bin:/bin", **(env or {})})


def test_check_config_valid_prints_effective_config(tmp_path: Path) -> None:
    path = write(tmp_path, "http: {port: 9100}\nadmin: {password: topsecret}\n")
    result = run_cli("check-config", str(path), env={"RTCHAT_SSE__RETRY_MS": "900"})
    assert result.returncode == 0, result.stderr
    assert "port: 9100" in result.stdout
    assert "retry_ms: 900" in result.stdout
    assert "topsecret" not in result.stdout


@pytest.mark.parametrize(("text", "expected"), [
    ("http: {port: eighty}", "http.port: must be an integer"),
    ("logging: {levle: info}", "logging.levle: unknown key"),
    ("http: [", "not valid YAML"),
])
def test_check_config_invalid_exits_2_without_traceback(tmp_path: Path, text: str,
                                                        expected: str) -> None:
    result = run_cli("check-config", str(write(tmp_path, text)))
    assert result.returncode == 2
    assert expected in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


def test_running_with_a_bad_config_exits_2_naming_the_key(tmp_path: Path) -> None:
    result = run_cli("--config", str(write(tmp_path, "sse: {retry_ms: -5}")))
    assert result.returncode == 2
    assert "sse.retry_ms: must be greater than 0" in result.stderr
    assert "Traceback" not in result.stderr
    result = run_cli(env={"RTCHAT_BROKER__BACKEND": "kafka"})
    assert result.returncode == 2
    assert "broker.backend" in result.stderr and "Traceback" not in result.stderr


# --- environment variables that name no setting, and Redis URLs checked whole ----------------


@pytest.mark.parametrize(("name", "path", "suggestion"), [
    # One underscore, as the compose file names its own variable: never silently ignored.
    ("RTCHAT_ADMIN_PASSWORD", "RTCHAT_ADMIN_PASSWORD", "RTCHAT_ADMIN__PASSWORD"),
    ("RTCHAT_HTTP__PROT", "http.prot", "RTCHAT_HTTP__PORT"),
    ("RTCHAT_BROKER__REDIS__MASTERS", "broker.redis.masters", "RTCHAT_BROKER__REDIS__MASTER"),
    ("RTCHAT_PORT", "RTCHAT_PORT", "RTCHAT_HTTP__PORT"),
    ("RTCHAT_SSE__", "RTCHAT_SSE__", "RTCHAT_SSE__RETRY_MS"),
    ("RTCHAT_TOTALLY_UNRELATED", "RTCHAT_TOTALLY_UNRELATED", None),
])
def test_unknown_environment_variables_are_errors(name: str, path: str, suggestion: str | None
                                                  ) -> None:
    with pytest.raises(config.ConfigError) as info:
        config.load(None, {name: "x", "RTCHAT_HTTP__PORT": "9000"})
    assert info.value.path == path
    assert name in str(info.value) and "names no setting" in str(info.value)
    if suggestion is not None:
        assert f"did you mean {suggestion}?" in str(info.value)
    else:
        assert "did you mean" not in str(info.value)


def test_every_setting_has_a_variable_and_rtchat_config_is_the_exception(tmp_path: Path) -> None:
    names = config.setting_names()
    assert names["admin.password"] == "RTCHAT_ADMIN__PASSWORD"
    assert names["broker.redis.sentinel.hosts"] == "RTCHAT_BROKER__REDIS__SENTINEL__HOSTS"
    assert "limits.rate" not in names and names["limits.rate.burst"] == "RTCHAT_LIMITS__RATE__BURST"
    cfg = config.load(None, {"RTCHAT_CONFIG": str(tmp_path / "x.yaml"),
                             "RTCHAT_LIMITS__RATE__BURST": "7", "OTHER_THING": "1"})
    assert cfg.limits.rate.burst == 7


@pytest.mark.parametrize(("key", "value", "reason"), [
    ("master", "redis://h:notaport/0", "port must be a number from 1 to 65535, not 'notaport'"),
    ("master", "redis://h:0/0", "port must be from 1 to 65535, not 0"),
    ("master", "redis://h:70000/0", "port must be a number from 1 to 65535"),
    ("master", "redis://:6379/0", "has no host"),
    ("master", "redis://h:6379/zero", "db must be a number"),
    ("master", "redis://h:/0", "has a ':' but no port"),
    ("master", "http://h:6379/0", "must be a redis://"),
    ("replicas", "[redis://a:6380/0, redis://b:63x0/0]", "redis://b:63x0/0: port must be a number"),
])
def test_redis_urls_are_checked_whole(key: str, value: str, reason: str) -> None:
    with pytest.raises(config.ConfigError) as info:
        config.load(None, {f"RTCHAT_BROKER__REDIS__{key.upper()}": value})
    assert info.value.path == f"broker.redis.{key}"
    assert reason in str(info.value)


def test_good_redis_urls_pass() -> None:
    for url in ("redis://h:6379/0", "redis://h", "rediss://user:pw@h.example.com:6380/3",
                "redis://[::1]:6379/0", "unix:///run/redis.sock?db=2"):
        assert config.load(None, {"RTCHAT_BROKER__REDIS__MASTER": url}).broker.redis.master == url


def test_check_config_and_start_refuse_a_misnamed_variable_and_a_bad_url(tmp_path: Path) -> None:
    path = write(tmp_path, "http: {port: 9100}\n")
    result = run_cli("check-config", str(path), env={"RTCHAT_ADMIN_PASSWORD": "pw"})
    assert result.returncode == 2 and result.stdout == ""
    assert "RTCHAT_ADMIN_PASSWORD: names no setting; did you mean RTCHAT_ADMIN__PASSWORD?" \
        in result.stderr
    assert "Traceback" not in result.stderr
    result = run_cli("--config", str(path), env={"RTCHAT_HTTP__PROT": "9000"})
    assert result.returncode == 2 and "http.prot" in result.stderr
    assert "RTCHAT_HTTP__PORT" in result.stderr and "Traceback" not in result.stderr
    result = run_cli("check-config", str(path),
                     env={"RTCHAT_BROKER__REDIS__MASTER": "redis://h:notaport/0"})
    assert result.returncode == 2
    assert "broker.redis.master: port must be a number" in result.stderr
    result = run_cli("--config", str(write(tmp_path, "broker: {redis: {master: 'redis://h:notaport/0'}}")))
    assert result.returncode == 2 and "broker.redis.master: " in result.stderr
    assert "Traceback" not in result.stderr
