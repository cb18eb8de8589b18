"""The package-per-service architecture: import contracts, discovery, lazy start-up."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from engine import cli
from engine.models import TASK_STATUSES
from engine.settings import Settings
from tests.helpers import ROOT, dew_env

LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")
HEAVY = ("pkcs11", "asyncssh", "asyncpg", "aiomysql", "engine.crypto", "cryptography")


def lint_imports(tree: Path) -> subprocess.CompletedProcess[str]:
    # PYTHONPATH first: the tree under test, not the installed (editable) one.
    return subprocess.run([str(LINT_IMPORTS), "--no-cache"], cwd=tree, capture_output=True,
                          text=True, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(tree)},
                          timeout=120)


def copy_tree(tmp_path: Path) -> Path:
    tree = tmp_path / "tree"
    for name in ("engine", "handlers", "schedules"):
        shutil.copytree(ROOT / name, tree / name,
                        ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tree / "pyproject.toml")
    return tree


def test_the_import_contracts_hold() -> None:
    done = lint_imports(ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 kept, 0 broken" in done.stdout


@pytest.mark.parametrize(("module", "line", "contract"), [
    ("engine/queue.py", "import handlers.kps.ssh", "engine imports neither handlers"),
    ("engine/worker.py", "import schedules.cli", "engine imports neither handlers"),
    ("handlers/csms/model.py", "from handlers.kms.service import KmsService",
     "services import each other only"),
    ("handlers/kps/keys.py", "import handlers.csms.store", "services import each other only"),
])
def test_a_violating_import_breaks_the_contract(
    tmp_path: Path, module: str, line: str, contract: str
) -> None:
    tree = copy_tree(tmp_path)
    with (tree / module).open("a") as f:
        f.write(f"\n{line}  # noqa\n")
    done = lint_imports(tree)
    assert done.returncode == 1, done.stdout
    assert f"{contract}" in done.stdout and "BROKEN" in done.stdout


def loaded_modules(settings: Settings, *argv: str) -> tuple[int, list[str]]:
    """Run ``dew ARGV`` in a fresh interpreter; its exit code and the modules it imported."""
    code = (
        "import json, sys\n"
        "from engine.cli import main\n"
        "try:\n"
        f"    rc = main({list(argv)!r})\n"
        "except SystemExit as e:\n"
        "    rc = e.code\n"
        "sys.stderr.write(json.dumps([rc, sorted(sys.modules)]))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], env=dew_env(settings), cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    rc, modules = json.loads(done.stderr.splitlines()[-1])
    return rc, modules


def test_help_and_task_listing_import_no_hsm_ssh_or_database_driver(
    settings: Settings
) -> None:
    rc, modules = loaded_modules(settings, "--help")
    assert rc == 0
    assert not [m for m in modules if m.split(".")[0] in ("arq", "redis", "structlog", "asyncio")]
    assert not [m for m in modules if m.startswith(HEAVY)]
    # Only the services' one-file declarations, none of their code.
    assert {m for m in modules if m.startswith("handlers.")} <= {
        "handlers.builtin", "handlers.kms", "handlers.csms", "handlers.kps"}

    rc, modules = loaded_modules(settings, "tasks", "list", "--limit", "1")
    assert rc == 0
    assert not [m for m in modules if m.startswith(HEAVY)]
    # Their settings sections only (plain dataclasses).
    assert {m for m in modules if m.startswith("handlers.") and m.count(".") > 1} <= {
        "handlers.kms.config", "handlers.csms.config", "handlers.kps.config"}


def test_the_cli_task_statuses_match_the_models() -> None:
    assert cli.TASK_STATUSES == TASK_STATUSES


BROKEN_SERVICE = '''
from engine.services import ServiceSpec

SERVICE = ServiceSpec(
    "broken", commands={"broken": "a service whose dependency is missing"},
    cli="brokensvc.cli", jobs="brokensvc.jobs", schedules="brokensvc.jobs",
)
'''


def test_a_service_missing_a_dependency_fails_alone(settings: Settings, tmp_path: Path) -> None:
    package = tmp_path / "brokensvc"
    package.mkdir()
    (package / "__init__.py").write_text(BROKEN_SERVICE)
    for part in ("cli", "jobs"):
        (package / f"{part}.py").write_text("import not_a_real_package_xyz  # noqa\n")
    env = dew_env(settings, PYTHONPATH=str(tmp_path),
                  DEW_ENGINE_SERVICES="handlers.builtin,handlers.kms,brokensvc")

    def dew(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "engine.cli", *argv], env=env, cwd=ROOT,
                              capture_output=True, text=True, timeout=60)

    done = dew("broken", "anything")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "dew: error: the broken service is unavailable: the Python package "
        "'not_a_real_package_xyz' is missing"]
    assert "broken" in dew("--help").stdout  # still listed, by its declaration
    done = dew("kms", "gen-random", "--bytes", "16", "--json")
    assert done.returncode == 0, done.stderr
    assert len(json.loads(done.stdout)["random_data"]) == 32  # hex
    jobs = dew("jobs")
    assert jobs.returncode == 0 and "engine.echo" in jobs.stdout and "kms." in jobs.stdout
    assert "broken service is unavailable" in jobs.stderr
    schedules = dew("schedules", "list")  # not configured here: an unknown command
    assert schedules.returncode == 2


def test_an_unknown_service_package_is_one_line(settings: Settings) -> None:
    env = dew_env(settings, DEW_ENGINE_SERVICES="handlers.kms,handlers.nope")
    done = subprocess.run([sys.executable, "-m", "engine.cli", "tasks", "list"], env=env,
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "dew: error: engine.services names 'handlers.nope', which is not an installed package"]
