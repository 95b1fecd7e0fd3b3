"""The architecture, held by the import graph: who may import what."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "rtchat"


def imports_of(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def modules() -> dict[str, set[str]]:
    return {str(p.relative_to(PACKAGE)): imports_of(p) for p in PACKAGE.rglob("*.py")}


def test_only_the_web_layer_imports_tornado() -> None:
    allowed = ("app.py", "handlers/", "admin/", "__main__.py", "bench.py")
    for name, imported in modules().items():
        if any(m == "tornado" or m.startswith("tornado.") for m in imported):
            assert name.startswith(allowed), f"{name} imports tornado"


def test_only_the_redis_broker_imports_redis() -> None:
    for name, imported in modules().items():
        if any(m == "redis" or m.startswith("redis.") for m in imported):
            assert name == "broker/redis.py", f"{name} imports redis"


def test_only_config_imports_yaml() -> None:
    for name, imported in modules().items():
        if "yaml" in imported:
            assert name == "config.py", f"{name} imports yaml"


def test_leaves_import_nothing_of_rtchat_but_each_other() -> None:
    leaves = {"config.py", "messages.py", "sse.py"}
    for name in leaves:
        own = {m for m in modules()[name] if m.startswith("rtchat")}
        assert own <= {"rtchat.messages"}, f"{name} imports {own}"


def test_hub_and_brokers_do_not_know_the_web_layer() -> None:
    for name, imported in modules().items():
        if name == "hub.py" or name.startswith("broker/"):
            web = {m for m in imported if m.startswith(("rtchat.handlers", "rtchat.app", "rtchat.admin"))}
            assert not web, f"{name} imports {web}"
