"""The distribution: its PyPI name, and a wheel that holds exactly the three import packages."""

from __future__ import annotations

import configparser
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

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
