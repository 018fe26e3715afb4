"""The layers of server/ import one way: front ends -> service -> repository -> core -> runtime.

Checked on the source with `ast` (every import statement, inside functions too), so a
lazy import cannot slip an arrow the wrong way. The generated schema may be imported from
anywhere but imports nothing of ortserve's except itself; transports (grpc, protobuf's
wire code) stay in the front ends.
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import ROOT

SERVER = ROOT / "server"
# What each package may import of server/ besides itself and the schema.
ALLOWED: dict[str, set[str]] = {
    # logs: request ids, the access log and the audit log; a leaf of the standard library only (checked below).
    "rpc": {"service", "repository", "core", "runtime", "logs"},
    "http": {"service", "repository", "core", "runtime", "logs"},
    "service": {"repository", "core", "runtime", "workers", "logs"},
    "repository": {"core", "runtime"},
    "core": {"runtime"},
    # The runtime speaks the core's vocabulary (errors, datatype names) and nothing more.
    "runtime": {"core.errors", "core.datatypes"},
    "schema": set(),
}
# Third-party packages that only a front end may use.
TRANSPORT = ("grpc", "grpc_health", "grpc_reflection")
# Protobuf is the schema's own format (the repository parses config files with it);
# the data plane, the core and the runtime never touch it.
NO_PROTOBUF = ("http", "service", "core", "runtime")


def imports(path: Path, root: Path = ROOT) -> list[str]:
    """Every module a file imports, relative imports resolved to absolute names."""
    package = ".".join(path.relative_to(root).with_suffix("").parts[:-1])
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parent = ".".join(parts[: len(parts) - node.level + 1])
                base = f"{parent}.{base}" if base else parent
            found += [base] + [f"{base}.{alias.name}" for alias in node.names]
    return found


def layer_files(layer: str) -> list[Path]:
    return sorted((SERVER / layer).rglob("*.py"))


def test_each_layer_imports_only_the_layers_below_it() -> None:
    wrong = []
    for layer, allowed in ALLOWED.items():
        for path in layer_files(layer):
            for module in imports(path):
                if not module.startswith("server."):
                    continue
                target = module.removeprefix("server.")
                top = target.split(".")[0]
                if top in (layer, "schema"):
                    continue
                if not any(target == a or target.startswith(a + ".") for a in allowed):
                    # `from server.core import errors` names the package, then the module.
                    if target in {a.split(".")[0] for a in allowed}:
                        continue
                    wrong.append(f"{path.relative_to(ROOT)} imports {module}")
    assert not wrong, "\n".join(wrong)


def test_transports_stay_in_the_front_ends() -> None:
    wrong = []
    for layer in ALLOWED:
        if layer == "rpc":
            continue
        for path in layer_files(layer):
            for module in imports(path):
                top = module.split(".")[0]
                if top in TRANSPORT or (layer in NO_PROTOBUF and module.startswith("google.protobuf")):
                    wrong.append(f"{path.relative_to(ROOT)} imports {module}")
    assert not wrong, "\n".join(wrong)


def test_the_checker_sees_relative_and_lazy_imports(tmp_path: Path) -> None:
    """The rule itself: a wrong-way import written relatively or inside a function is found."""
    probe = tmp_path / "server" / "core" / "probe.py"
    probe.parent.mkdir(parents=True)
    probe.write_text("def f():\n    from ..rpc import status\n    import grpc\n")
    assert "server.rpc.status" in imports(probe, tmp_path) and "grpc" in imports(probe, tmp_path)


def test_logging_module_imports_nothing_of_the_server() -> None:
    """server/logs.py is imported by both front ends; it must stay a leaf."""
    assert [m for m in imports(SERVER / "logs.py") if m.startswith("server")] == []


def layer_diagram() -> str:
    """The layers and the imports allowed between them, as a Mermaid graph (docs/architecture.md shows it)."""
    lines = ["```mermaid", "graph TD"]
    for layer, allowed in ALLOWED.items():
        for target in sorted({t.split(".")[0] for t in allowed}):
            lines.append(f"    {layer} --> {target}")
    lines.append("```")
    return "\n".join(lines)


def test_architecture_document_shows_the_layers_this_test_enforces() -> None:
    document = (ROOT / "docs" / "architecture.md").read_text()
    assert layer_diagram() in document, (
        "regenerate the diagram: python -c 'from tests.test_layers import *; print(layer_diagram())'"
    )


def test_every_file_of_the_documented_request_route_exists() -> None:
    document = (ROOT / "docs" / "architecture.md").read_text()
    rows = [line.split("|") for line in document.splitlines() if line.startswith("| ")]
    route = [row[2].strip().strip("`") for row in rows if row[1].strip().isdigit()]
    assert 0 < len(route) <= 6, "the route of a request runs through at most six files"
    for path in route:
        assert (ROOT / path).is_file(), path
