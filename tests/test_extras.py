"""Heavy dependencies are optional extras: the core installs and imports without them, and a missing one is a
one-line error naming the pip install."""

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from pudding.core.errors import ConfigError, MissingExtraError
from pudding.core.extras import EXTRAS, pyplot, require

REPO = Path(__file__).parents[1]
# import name -> the extra that provides it
OPTIONAL = {"fastapi": "serve", "starlette": "serve", "uvicorn": "serve", "prometheus_client": "serve",
            "httpx": "serve", "matplotlib": "plots", "ray": "ray", "peft": "heal", "lm_eval": "lm-eval"}


def _block(monkeypatch, *names):
    """Make ``import name`` fail as it does when the package is not installed."""
    for name in names:
        monkeypatch.setitem(sys.modules, name, None)


def _one_line(error: BaseException, package: str, extra: str) -> str:
    message = str(error)
    assert "\n" not in message
    assert message.endswith(f"needs {package}: pip install 'pudding[{extra}]'"), message
    assert isinstance(error, ConfigError) and isinstance(error, ImportError) and error.name == package
    return message


def test_require_returns_the_module_or_names_the_extra(monkeypatch):
    assert require("json", "serve") is json
    _block(monkeypatch, "fastapi")
    with pytest.raises(MissingExtraError) as caught:
        require("fastapi", "serve")
    assert _one_line(caught.value, "fastapi", "serve") == ("serving (pudding serve, the gateway) needs fastapi: "
                                                           "pip install 'pudding[serve]'")
    with pytest.raises(KeyError):
        require("json", "no-such-extra")


def test_a_plot_without_matplotlib_names_the_plots_extra(monkeypatch, tmp_path):
    from pudding.routing.train import plot_history

    _block(monkeypatch, "matplotlib", "matplotlib.pyplot")
    with pytest.raises(MissingExtraError) as caught:
        pyplot()
    _one_line(caught.value, "matplotlib", "plots")
    history = [{"epoch": 1, "train_loss": 1.0, "val_loss": 1.0, "val_top1_agreement": 0.5}]
    with pytest.raises(MissingExtraError, match=r"plotting needs matplotlib: pip install 'pudding\[plots\]'"):
        plot_history(history, "router", tmp_path / "training.png")
    assert not (tmp_path / "training.png").exists()


def test_the_server_without_fastapi_names_the_serve_extra(monkeypatch, capsys):
    import importlib

    from pudding.cli import main

    for module in ("pudding.serving.server", "pudding.serving.gateway"):
        monkeypatch.delitem(sys.modules, module, raising=False)  # restored afterwards; imported afresh below
    _block(monkeypatch, "fastapi")
    with pytest.raises(MissingExtraError) as caught:
        importlib.import_module("pudding.serving.server")
    _one_line(caught.value, "fastapi", "serve")
    assert main(["serve", "--model", "default"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.endswith("needs fastapi: pip install 'pudding[serve]'"), err


def test_uvicorn_and_prometheus_are_asked_for_where_they_are_used(monkeypatch):
    from pudding.serving.server import _metrics, run_server

    _block(monkeypatch, "uvicorn", "prometheus_client")
    with pytest.raises(MissingExtraError) as caught:
        run_server(object())
    _one_line(caught.value, "uvicorn", "serve")
    with pytest.raises(MissingExtraError) as caught:
        _metrics()
    _one_line(caught.value, "prometheus_client", "serve")


def test_the_ray_executor_without_ray_names_the_ray_extra(monkeypatch, tiny_dir, tmp_path):
    from pudding.pruning.candidates import PoolConfig, build_pool

    _block(monkeypatch, "ray")
    config = PoolConfig(model=tiny_dir, tasks="piqa", objectives="tl", k=1, samples=2, run_dir=str(tmp_path / "run"),
                        out=str(tmp_path / "pool"), progress=False, executor="ray")
    with pytest.raises(MissingExtraError) as caught:
        build_pool(config)
    assert _one_line(caught.value, "ray", "ray").startswith("the Ray executor (--executor ray) needs ray")


BLOCKER = """
import importlib, pkgutil, sys
BLOCKED = {blocked!r}

class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)

sys.meta_path.insert(0, Blocker())
import pudding
failed = []
for info in pkgutil.walk_packages(pudding.__path__, "pudding."):
    if info.name.split(".")[1] in {stages!r}:
        try:
            importlib.import_module(info.name)
        except Exception as error:
            failed.append(f"{{info.name}}: {{error}}")
print("\\n".join(failed) or "ok")
print(sorted(name for name in sys.modules if name.split(".")[0] in BLOCKED))
"""


def test_the_core_pool_and_pruning_modules_import_without_any_extra():
    """Every module of the stages that need no extra imports with all of them missing, and pulls none in."""
    stages = ("core", "pool", "pruning")
    script = BLOCKER.format(blocked=sorted(OPTIONAL), stages=stages)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, cwd=REPO)
    assert result.returncode == 0, result.stderr[-2000:]
    failed, loaded = result.stdout.strip().splitlines()[-2:]
    assert failed == "ok" and loaded == "[]", result.stdout


def test_the_blocker_does_block():
    """The check above can fail: a module that needs an extra at import time is reported."""
    script = BLOCKER.format(blocked=sorted(OPTIONAL), stages=("serving",))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, cwd=REPO)
    assert "pudding.serving.server: serving (pudding serve, the gateway) needs fastapi" in result.stdout


def test_pyproject_keeps_the_extras_out_of_the_core_and_installs_them_all_for_the_tests():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]

    def names(requirements):
        return {r.split("[")[0].split(">")[0].split("=")[0].split("<")[0].strip().lower().replace("_", "-")
                for r in requirements}

    optional = names(r for extra in EXTRAS for r in extras[extra])
    assert {"fastapi", "uvicorn", "prometheus-client", "matplotlib", "ray"} <= optional
    assert not optional & names(project["dependencies"]), "an extra's package is a core dependency"
    assert set(EXTRAS) < set(extras)
    assert optional <= names(extras["test"]) and optional <= names(extras["all"])  # setup.sh installs [test]
    pinned = names(line for line in (REPO / "constraints.txt").read_text().splitlines() if "==" in line)
    assert optional <= pinned
    assert '".[test]"' in (REPO / "scripts" / "setup.sh").read_text()
