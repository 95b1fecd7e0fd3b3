"""The architecture, held by the import graph: who may import what."""

import functools
import json
import re
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "rtchat"


# The import graph is read in a fresh interpreter: CPython 3.11.7's ast module can
# fail with "AST constructor recursion depth mismatch" (gh-106905) depending on what
# ran before it in the same process. Every import counts, function-level ones too.
_READ_GRAPH = """
import ast, json, pathlib, sys
root = pathlib.Path(sys.argv[1])
out = {}
for path in sorted(root.rglob("*.py")):
    text = path.read_text()
    tree = ast.parse(text)
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            # "from rtchat import bench" imports the module rtchat.bench.
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    out[str(path.relative_to(root))] = {"imports": sorted(names), "lines": len(text.splitlines()),
                                        "doc": ast.get_docstring(tree) or ""}
print(json.dumps(out))
"""


@functools.cache
def _read() -> dict[str, dict]:
    out = subprocess.run([sys.executable, "-c", _READ_GRAPH, str(PACKAGE)], capture_output=True,
                         text=True, check=True, timeout=60).stdout
    return json.loads(out)


@functools.cache
def modules() -> dict[str, set[str]]:
    """File (relative to rtchat/) -> every name it imports."""
    return {name: set(info["imports"]) for name, info in _read().items()}


def module_file(dotted: str) -> str | None:
    """The file of an rtchat module name (``rtchat.broker.redis`` -> its ``__init__.py``)."""
    if dotted != "rtchat" and not dotted.startswith("rtchat."):
        return None
    rel = dotted.split(".")[1:]
    for candidate in ("/".join(rel) + ".py", "/".join([*rel, "__init__.py"])):
        if candidate.lstrip("/") in modules():
            return candidate.lstrip("/")
    return None  # a name imported from a module, not a module


def rtchat_edges() -> dict[str, set[str]]:
    """File -> the rtchat files it imports."""
    return {name: {f for f in map(module_file, imported) if f is not None and f != name}
            for name, imported in modules().items()}


def test_only_the_web_layer_imports_tornado() -> None:
    allowed = ("app.py", "server.py", "node.py", "handlers/", "admin/", "__main__.py")
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


def test_bench_knows_nothing_of_rtchat_but_itself() -> None:
    """The load generator speaks HTTP and SSE only, so it can measure any server."""
    for name, imported in modules().items():
        if name.startswith("bench"):
            own = {m for m in imported if m.startswith("rtchat") and not m.startswith("rtchat.bench")}
            assert not own, f"{name} imports {own}"
            assert not any(m.split(".")[0] in ("tornado", "redis", "yaml") for m in imported), name


def test_redis_broker_parts_do_not_import_the_broker() -> None:
    """The parts call back (the subscription's Listener); only the package re-exports it."""
    for name, imported in modules().items():
        if name.startswith("broker/redis/") and name not in ("broker/redis/broker.py",
                                                              "broker/redis/__init__.py"):
            assert "rtchat.broker.redis.broker" not in imported, name
            assert "rtchat.broker.redis" not in imported, name


def test_no_import_cycles() -> None:
    edges = rtchat_edges()
    done: set[str] = set()

    def visit(name: str, path: list[str]) -> None:
        if name in path:
            cycle = [*path[path.index(name):], name]
            raise AssertionError("import cycle: " + " -> ".join(cycle))
        if name in done:
            return
        for dep in sorted(edges.get(name, ())):
            visit(dep, [*path, name])
        done.add(name)

    for name in sorted(edges):
        visit(name, [])


MAX_LINES = 500


def test_no_module_over_500_lines_without_a_reason() -> None:
    """A big file is fine when it has one job, and its docstring says which and why."""
    for name, info in _read().items():
        if info["lines"] > MAX_LINES:
            assert "one job" in info["doc"], (
                f"{name} has {info['lines']} lines; split it, or say in its docstring why it "
                "is one job")


def test_the_graph_reader_sees_the_tree() -> None:
    """The checks above are only as good as the graph: spot-check that it is real."""
    edges = rtchat_edges()
    assert "broker/redis/broker.py" in edges["broker/redis/__init__.py"]
    assert "broker/base.py" in edges["hub.py"]
    assert module_file("rtchat.broker.redis") == "broker/redis/__init__.py"


def test_handlers_ask_the_hub_never_the_broker() -> None:
    """The hub is the web layer's only door: no handler reaches through ``hub.broker``."""
    for path in [*PACKAGE.joinpath("handlers").glob("*.py"), PACKAGE / "admin" / "handlers.py"]:
        text = path.read_text()
        assert re.search(r"hub\.broker\b(?!_)", text) is None, path.name
