"""The architecture, held by the import graph: who may import what."""

import functools
import json
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "rtchat"


# The import graph is read in a fresh interpreter: CPython 3.11.7's ast module can
# fail with "AST constructor recursion depth mismatch" (gh-106905) depending on what
# ran before it in the same process.
_READ_GRAPH = """
import ast, json, pathlib, sys
root = pathlib.Path(sys.argv[1])
graph = {}
for path in sorted(root.rglob("*.py")):
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    graph[str(path.relative_to(root))] = sorted(names)
print(json.dumps(graph))
"""


@functools.cache
def modules() -> dict[str, set[str]]:
    out = subprocess.run([sys.executable, "-c", _READ_GRAPH, str(PACKAGE)], capture_output=True,
                         text=True, check=True, timeout=60).stdout
    return {name: set(imported) for name, imported in json.loads(out).items()}


def test_only_the_web_layer_imports_tornado() -> None:
    allowed = ("app.py", "handlers/", "admin/", "__main__.py")
    for name, imported in modules().items():
        if any(m == "tornado" or m.startswith("tornado.") for m in imported):
            assert name.startswith(allowed), f"{name} imports tornado"


def test_only_the_redis_broker_imports_redis() -> None:
    for name, imported in modules().items():
        if any(m == "redis" or m.startswith("redis.") for m in imported):
            assert name.startswith("broker/redis/"), f"{name} imports redis"


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
