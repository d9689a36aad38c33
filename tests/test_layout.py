"""Layers that point one way, read from the source: the core knows nothing of queues, metrics or
the web; the worker, metrics and web layers know nothing of the command line or the demo; nothing
imports those two; and no module imports itself back through others.

Layers, innermost first: the core (`mailpipe`) <- the worker (`broker_config`, `middleware`,
`worker`, `actors`), `metrics` and `web` <- the command line (`cli`) and the demo (`demo`, a
development package outside the wheel).
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
from setuptools import find_packages

ROOT = Path(__file__).resolve().parents[1]
CORE = {"mailpipe"}
WORKER = {"broker_config", "middleware", "worker", "actors"}
MIDDLE = WORKER | {"metrics", "web"}
OUTER = {"cli", "demo"}
PRODUCT = CORE | MIDDLE | {"cli"}
QUEUE_AND_WEB_LIBRARIES = {"dramatiq", "periodiq", "prometheus_client", "flask", "werkzeug"}


def module_files() -> Iterator[tuple[str, Path]]:
    """(dotted name, file) of every module of the product and the demo."""
    for top in sorted(PRODUCT | OUTER):
        single = ROOT / f"{top}.py"
        if single.is_file():
            yield top, single
            continue
        for path in sorted((ROOT / top).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            yield ".".join(parts[:-1] if parts[-1] == "__init__" else parts), path


FILES = dict(module_files())


def imported(name: str, path: Path) -> Iterator[str]:
    """Every module an import statement in the file names, in functions and TYPE_CHECKING too;
    `from package import name` counts as the submodule when there is one of that name."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                yield submodule if submodule in FILES else base


GRAPH = {name: set(imported(name, path)) for name, path in FILES.items()}


def top(module: str) -> str:
    return module.split(".")[0]


def imports_of(layer: set[str]) -> dict[str, set[str]]:
    return {name: targets for name, targets in GRAPH.items() if top(name) in layer}


def cycle() -> list[str] | None:
    """One import cycle among the project's modules, as the modules around it, or None."""
    done: set[str] = set()
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        if module in path:
            return [*path[path.index(module) :], module]
        if module in done:
            return None
        path.append(module)
        for target in sorted(GRAPH[module] & FILES.keys()):
            found = visit(target)
            if found:
                return found
        path.pop()
        done.add(module)
        return None

    for module in sorted(GRAPH):
        found = visit(module)
        if found:
            return found
    return None


# -- the static import graph ---------------------------------------------------------------


def test_the_graph_sees_function_level_and_relative_imports():
    # Given modules known to import inside a function and relatively
    # Then both kinds are edges of the graph
    assert "actors.pipeline" in GRAPH["actors.schedule"]  # inside schedule_due
    assert "web.present" in GRAPH["web.app"]  # `from . import present`
    assert "cli.common" in GRAPH["cli.queue"]  # `from .common import ...`


def test_no_module_imports_itself_back_through_others():
    assert cycle() is None, " -> ".join(cycle() or [])


def test_the_core_imports_no_queue_metrics_or_web_library_and_no_outer_layer():
    # Given every import in the core
    # Then none is a queue, metrics or web library, or a module of an outer layer
    wrong = {
        f"{name} imports {target}"
        for name, targets in imports_of(CORE).items()
        for target in targets
        if top(target) in QUEUE_AND_WEB_LIBRARIES | MIDDLE | OUTER
    }
    assert wrong == set()


def test_worker_metrics_and_web_import_neither_the_command_line_nor_the_demo():
    wrong = {
        f"{name} imports {target}"
        for name, targets in imports_of(MIDDLE).items()
        for target in targets
        if top(target) in OUTER
    }
    assert wrong == set()


def test_middleware_imports_no_actor():
    assert {target for target in GRAPH["middleware"] if top(target) == "actors"} == set()


@pytest.mark.parametrize("outer", sorted(OUTER | {"broker_config"}))
def test_nothing_imports_the_entry_points(outer):
    # Given the command line, the demo and broker_config (which `dramatiq` names on its command
    # line): Then no other module imports them
    importers = {
        name for name, targets in GRAPH.items() if top(name) != outer and outer in map(top, targets)
    }
    assert importers == set()


# -- what importing does -------------------------------------------------------------------


def run_probe(code: str, **env: str) -> dict:
    """Run `code` in a fresh interpreter from the checkout; it prints one JSON object."""
    clean = {k: v for k, v in __import__("os").environ.items() if not k.startswith("MAILPIPE_")}
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


CORE_PROBE = """
import importlib, json, pkgutil, sys
import mailpipe
for module in pkgutil.walk_packages(mailpipe.__path__, "mailpipe."):
    if not module.name.startswith("mailpipe.migrations"):
        importlib.import_module(module.name)
libraries = ("dramatiq", "prometheus_client", "periodiq", "flask")
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in libraries)))
"""


def test_core_imports_no_queue_or_metrics_library():
    assert run_probe(CORE_PROBE) == []


MOUNT_PROBE = """
import json, sys
import redis
clients = []
made = redis.Redis.__init__
def counted(self, *args, **kwargs):
    clients.append(1)
    made(self, *args, **kwargs)
redis.Redis.__init__ = counted
import dramatiq
import web.app
import web.blueprint
print(json.dumps({
    "broker": dramatiq.broker.global_broker is not None,
    "redis_clients": len(clients),
    "loaded": sorted(m for m in ("broker_config", "actors") if m in sys.modules),
}))
"""


def test_mounting_the_blueprint_builds_no_broker_and_opens_no_connection():
    # Given a host app's environment naming a Redis broker
    # When it imports the blueprint and the app factory
    found = run_probe(MOUNT_PROBE, MAILPIPE_BROKER_URL="redis://127.0.0.1:1/0")
    # Then no broker was set, no Redis client made, and neither broker_config nor actors loaded
    assert found == {"broker": False, "redis_clients": 0, "loaded": []}


ACTORS_PROBE = """
import json, sys
import dramatiq
try:
    import actors
    said = None
except ImportError as error:
    said = str(error)
print(json.dumps({"said": said, "broker": dramatiq.broker.global_broker is not None,
                  "broker_config": "broker_config" in sys.modules}))
"""


def test_importing_actors_before_the_broker_is_set_says_so_and_builds_none():
    found = run_probe(ACTORS_PROBE, MAILPIPE_BROKER_URL="redis://127.0.0.1:1/0")
    assert found["said"].startswith("set the broker before importing actors")
    assert (found["broker"], found["broker_config"]) == (False, False)


ENVIRONMENT_PROBE = """
import importlib, json, os, pkgutil
reads = []
class Recording(dict):
    def __getitem__(self, name):
        reads.append(name)
        return super().__getitem__(name)
    def get(self, name, default=None):
        reads.append(name)
        return super().get(name, default)
    def __contains__(self, name):
        reads.append(name)
        return super().__contains__(name)
os.environ = Recording(os.environ)
from mailpipe.settings import Settings
from worker.broker import use_broker
use_broker(Settings())  # actors need a broker; this one reads nothing
for top in ("mailpipe", "worker", "actors", "metrics", "web", "cli"):
    package = importlib.import_module(top)
    for module in pkgutil.walk_packages(package.__path__, top + "."):
        if not module.name.startswith("mailpipe.migrations") and module.name != "cli.__main__":
            importlib.import_module(module.name)
importlib.import_module("middleware")
print(json.dumps(sorted({name for name in reads if name.startswith("MAILPIPE_")})))
"""


def test_importing_the_product_reads_no_setting():
    # Given settings in the environment, one of them unusable
    # When every product module but the worker's entry point is imported
    read = run_probe(ENVIRONMENT_PROBE, MAILPIPE_MAX_RETRIES="many", MAILPIPE_DATA_DIR="/nowhere")
    # Then none of them read a MAILPIPE_* variable (only entry points call Settings.from_env)
    assert read == []


# -- what the wheel holds ------------------------------------------------------------------


def test_the_wheel_holds_the_product_packages_and_no_demo():
    # Given pyproject.toml's package discovery and the checkout's top-level packages
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    setuptools = config["tool"]["setuptools"]
    found = find_packages(str(ROOT), include=setuptools["packages"]["find"]["include"])
    packages = {path.parent.name for path in ROOT.glob("*/__init__.py")}
    # Then every product package (and only those) is in the wheel, the demo is not
    assert (
        {top(name) for name in found}
        == packages - {"tests", "bench", "demo"}
        == PRODUCT
        - {
            "broker_config",
            "middleware",
        }
    )
    assert set(setuptools["py-modules"]) == {"broker_config", "middleware"}
    # And an install pulls in no IMAP server: pymap is the demo's extra
    requirements = config["project"]["dependencies"]
    assert not [r for r in requirements if r.startswith("pymap")]
    assert [r for r in config["project"]["optional-dependencies"]["demo"] if "pymap" in r]


def test_the_command_line_loads_x509_only_to_read_a_certificate():
    # Given a fresh interpreter
    probe = "import sys, cli.main; print('cryptography.x509' in sys.modules)"
    # When it loads the command line (as `mailpipe --help` does)
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    )
    # Then the certificate parser is not loaded: only a TLS check that reads a certificate needs it
    assert result.stdout.strip() == "False"
