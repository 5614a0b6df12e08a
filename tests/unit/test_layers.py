"""The architecture's one-way imports, checked on the source (every import, lazy ones too).

Operator, bottom to top: the spec and its schema -> the desired state -> the reconciler
(pure) -> the runtimes (and the metrics they serve and read) -> the control loop -> its
drivers (the kopf handlers, ``worldmesh run``) -> the CLI. Worker, bottom to top: worlds,
errors and the control contract -> the protocol, routing and config -> models and early
exits -> the stage's roles -> the stage -> its servers -> the process (main, harness).

A module may import its own layer and those below; never above. The worker never imports
the operator. Every module is placed: a new one must be given a layer here.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

OPERATOR_LAYERS: list[tuple[str, set[str]]] = [
    ("spec", {"__init__", "schema", "spec", "settings"}),
    # builders: the Kubernetes objects of the desired state (no I/O); scaling: the policy
    # that decides the desired worker counts (pure).
    ("desired state", {"desired", "builders", "scaling", "ramp_leader"}),
    ("reconciler", {"reconciler"}),
    (
        "runtimes",
        {
            "runtime",
            "runtime.base",
            "runtime.local",
            "runtime.kubernetes",
            "runtime.kube_client",
            "runtime.front",
            "metrics",
            "metrics_source",
        },
    ),
    ("control loop", {"loop"}),
    ("drivers", {"handlers", "autoscaling", "run", "status"}),
    ("cli", {"cli", "demo", "load"}),
]

WORKER_LAYERS: list[tuple[str, set[str]]] = [
    (
        "foundations",
        {
            "__init__",
            "errors",
            "settings",
            "control",
            "batching",
            "offload",
            "metrics",
            "data",
            "worlds",
            "worlds.threads",
            "worlds.wire",
            "worlds.heartbeat",
            "worlds.rendezvous",
            "worlds.world",
            "worlds.manager",
        },
    ),
    (
        "protocol and wiring",
        {
            "_tensor_codec",
            "protocol",
            "router",
            "config",
            "oip",
            "oip.grpc_predict_v2_pb2",
            "oip.grpc_predict_v2_pb2_grpc",
        },
    ),
    (
        "models and early exits",
        {
            "models",
            "models.__main__",
            "models.base",
            "models.heads",
            "models.registry",
            "models.toy",
            "models.efficientnet",
            "models.sentence",
            "models.minilm",
            "models.mpnet",
            "exits",
            "exits.sites",
            "exits.tuner",
            "exits.manager",
            "exits.controller",
            "exits.ramps",
            "exits.train",
        },
    ),
    ("the stage's roles", {"peers", "front", "exits.stage"}),
    ("stage", {"stage"}),
    ("servers", {"server", "grpc_server"}),
    ("process", {"main", "__main__", "local", "loadgen"}),
]


def modules(package: str, base: Path) -> dict[str, Path]:
    """Module name (relative to ``package``; a package by its own name) -> file."""
    found = {}
    for path in sorted((base / package).rglob("*.py")):
        parts = list(path.relative_to(base / package).with_suffix("").parts)
        if parts[-1] == "__init__" and len(parts) > 1:
            parts.pop()
        found[".".join(parts)] = path
    return found


def imports(path: Path, package: str, name: str, known: set[str]) -> set[str]:
    """The modules of ``package`` (in ``known``) and the other top-level packages that the
    file imports, as ``package:module`` or ``other-package``."""
    is_package = path.name == "__init__.py"
    here = name.split(".") if name != "__init__" else []
    base = here if is_package else here[:-1]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parent = base[: len(base) - (node.level - 1)] if node.level > 1 else base
                stem = [*parent, *(node.module.split(".") if node.module else [])]
                prefix = [package, *stem]
            else:
                prefix = (node.module or "").split(".")
            targets = [".".join(prefix)]
            targets += [".".join([*prefix, alias.name]) for alias in node.names]
        for target in targets:
            top, _, rest = target.partition(".")
            if top != package:
                if top.startswith("worldmesh"):
                    out.add(top)
                continue
            if rest in known:
                out.add(f"{package}:{rest}")
            elif not rest:
                out.add(f"{package}:__init__")
    return out


def layer_of(layers: list[tuple[str, set[str]]], module: str) -> int:
    for index, (_, members) in enumerate(layers):
        if module in members:
            return index
    raise AssertionError(f"{module} has no layer: place it in tests/unit/test_layers.py")


@pytest.mark.parametrize(
    ("package", "base", "layers"),
    [
        ("worldmesh_operator", ROOT / "operator", OPERATOR_LAYERS),
        ("worldmesh_worker", ROOT / "worker", WORKER_LAYERS),
    ],
)
def test_nothing_imports_upward(package: str, base: Path, layers: list) -> None:
    found = modules(package, base)
    upward = []
    for name, path in found.items():
        mine = layer_of(layers, name)
        for target in imports(path, package, name, set(found)):
            other, _, module = target.partition(":")
            if other != package:
                continue
            theirs = layer_of(layers, module)
            if theirs > mine:
                upward.append(f"{name} ({layers[mine][0]}) imports {module} ({layers[theirs][0]})")
    assert upward == []


def test_the_worker_never_imports_the_operator() -> None:
    found = modules("worldmesh_worker", ROOT / "worker")
    offenders = [
        name
        for name, path in found.items()
        if "worldmesh_operator" in imports(path, "worldmesh_worker", name, set(found))
    ]
    assert offenders == []


def test_the_check_sees_an_upward_import(tmp_path: Path) -> None:
    """The walk finds relative, absolute and lazy imports (else the tests above pass
    on nothing)."""
    package = tmp_path / "worldmesh_operator"
    (package / "runtime").mkdir(parents=True)
    (package / "spec.py").write_text("def f():\n    from .loop import ControlLoop\n")
    (package / "runtime" / "base.py").write_text("from .. import handlers\n")
    (package / "desired.py").write_text("import worldmesh_operator.run\n")
    for name in ("loop", "handlers", "run"):
        (package / f"{name}.py").write_text("")
    found = modules("worldmesh_operator", tmp_path)
    assert imports(package / "spec.py", "worldmesh_operator", "spec", set(found)) == {
        "worldmesh_operator:loop"
    }
    assert imports(
        package / "runtime" / "base.py", "worldmesh_operator", "runtime.base", set(found)
    ) == {"worldmesh_operator:handlers", "worldmesh_operator:__init__"}
    assert imports(package / "desired.py", "worldmesh_operator", "desired", set(found)) == {
        "worldmesh_operator:run"
    }
