"""Each package's front door: ``__all__`` is exactly the public names, all documented, typed.

The rule for "public names": every attribute of the package's ``__init__`` that does not start
with ``_`` and is not a module. Each of them must be in ``__all__``, and each name in ``__all__``
must exist. Classes and functions among them, and the public methods and properties those
classes define themselves, carry a docstring of their own.
"""

from __future__ import annotations

import importlib
import inspect
import shutil
import subprocess
import sys
import types
from configparser import ConfigParser
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.asyncio

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ["distkit", "distlock", "distcache", "distkit.testing"]
DISTRIBUTION_ROOTS = ("distkit", "distlock", "distcache")


def module(name: str) -> types.ModuleType:
    return importlib.import_module(name)


def public_attributes(mod: types.ModuleType) -> set[str]:
    return {
        name
        for name, value in vars(mod).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    }


def own_docstring(obj: Any) -> str | None:
    if inspect.isclass(obj):
        doc = obj.__dict__.get("__doc__")
        return doc if isinstance(doc, str) else None
    return inspect.getdoc(obj) if obj.__doc__ else None


def documented_members(cls: type) -> dict[str, Any]:
    """Public methods and properties that ``cls`` itself defines (not inherited ones)."""
    out: dict[str, Any] = {}
    for name, value in vars(cls).items():
        if name.startswith("_"):
            continue
        if isinstance(value, (staticmethod, classmethod)):
            out[name] = value.__func__
        elif isinstance(value, property) or inspect.isfunction(value):
            out[name] = value
    return out


@pytest.mark.parametrize("name", PACKAGES)
def test_all_is_exactly_the_public_names(name: str) -> None:
    mod = module(name)
    exported = list(mod.__all__)
    assert len(exported) == len(set(exported)), "duplicates in __all__"
    missing = [n for n in exported if not hasattr(mod, n)]
    assert not missing, f"{name}.__all__ names what it does not define: {missing}"
    unlisted = public_attributes(mod) - set(exported)
    assert not unlisted, f"{name} has public names missing from __all__: {sorted(unlisted)}"


@pytest.mark.parametrize("name", PACKAGES)
def test_star_import_gives_exactly_all(name: str) -> None:
    namespace: dict[str, Any] = {}
    exec(f"from {name} import *", namespace)
    namespace.pop("__builtins__")
    assert set(namespace) == set(module(name).__all__)


@pytest.mark.parametrize("name", PACKAGES)
def test_every_class_and_function_of_the_distribution_is_exported(name: str) -> None:
    mod = module(name)
    ours = {
        attr
        for attr, value in vars(mod).items()
        if not attr.startswith("_")
        and (inspect.isclass(value) or inspect.isfunction(value))
        and value.__module__.split(".")[0] in DISTRIBUTION_ROOTS
    }
    assert ours <= set(mod.__all__)
    assert ours, f"{name} exports no class or function at all"


@pytest.mark.parametrize("name", PACKAGES)
def test_every_public_name_is_documented(name: str) -> None:
    mod = module(name)
    assert (mod.__doc__ or "").strip(), f"{name} has no module docstring"
    undocumented = []
    for attr in mod.__all__:
        value = getattr(mod, attr)
        if not (inspect.isclass(value) or inspect.isfunction(value)):
            continue
        if not (own_docstring(value) or "").strip():
            undocumented.append(attr)
        if inspect.isclass(value) and value.__module__.split(".")[0] in DISTRIBUTION_ROOTS:
            for member, obj in documented_members(value).items():
                if not (obj.__doc__ or "").strip():
                    undocumented.append(f"{attr}.{member}")
    assert not undocumented, f"{name}: no docstring on {undocumented}"


def test_re_exports_are_the_same_objects() -> None:
    import distcache
    import distkit
    import distlock

    for pkg in (distlock, distcache):
        for attr in pkg.__all__:
            if hasattr(distkit, attr):
                assert getattr(pkg, attr) is getattr(distkit, attr), f"{pkg.__name__}.{attr}"


def test_private_modules_are_private() -> None:
    import distkit

    for name, value in vars(distkit).items():
        if isinstance(value, types.ModuleType) and value.__name__.startswith("distkit."):
            assert name.startswith("_") or name == "testing", name


def test_client_aliases_are_real_types_at_run_time() -> None:
    import distkit

    sync_client = redis.Redis()  # no I/O until the first command
    async_client = redis.asyncio.Redis()
    try:
        assert isinstance(sync_client, distkit.SyncClient)
        assert isinstance(async_client, distkit.AsyncClient)
        assert not isinstance(async_client, distkit.SyncClient)
    finally:
        sync_client.close()


def test_version() -> None:
    import distkit

    parser = ConfigParser()
    parser.read(REPO / "setup.cfg")
    assert distkit.__version__ == parser["metadata"]["version"]


# -- py.typed ---------------------------------------------------------------------------------


@pytest.mark.parametrize("root", DISTRIBUTION_ROOTS)
def test_packages_have_py_typed(root: str) -> None:
    package_dir = Path(module(root).__file__ or "").parent
    assert (package_dir / "py.typed").is_file()
    parser = ConfigParser()
    parser.read(REPO / "setup.cfg")
    assert "py.typed" in parser["options.package_data"][root]


def test_a_build_ships_py_typed_and_every_subpackage(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for entry in ("setup.cfg", "pyproject.toml", "README.md"):
        if (REPO / entry).exists():
            shutil.copy(REPO / entry, src / entry)
    for entry in ("distkit", "distlock", "distcache", "benchmarks"):
        if (REPO / entry).is_dir():
            shutil.copytree(REPO / entry, src / entry, ignore=ignore)
    lib = tmp_path / "lib"
    setup = "from setuptools import setup; setup()"
    subprocess.run(
        [sys.executable, "-c", setup, "-q", "build_py", "--build-lib", str(lib)],
        cwd=src,
        check=True,
        capture_output=True,
        timeout=120,
    )
    for root in DISTRIBUTION_ROOTS:
        assert (lib / root / "py.typed").is_file(), root
        assert (lib / root / "__init__.py").is_file(), root
    assert (lib / "distkit" / "testing" / "__init__.py").is_file()
    assert not (lib / "tests").exists()


# -- contrib: optional, never imported by the core ---------------------------------------------

CONTRIB = {"distlock.contrib.celery": "celery", "distcache.contrib.django": "django"}


def test_the_core_never_imports_a_framework() -> None:
    code = (
        "import sys, distkit, distkit.testing, distlock, distcache\n"
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {sorted(CONTRIB.values())!r}"
        " or '.contrib.' in m))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_the_celery_contrib_front_door() -> None:
    pytest.importorskip("celery")
    name = "distlock.contrib.celery"
    mod = module(name)
    assert (mod.__doc__ or "").strip()
    assert set(mod.__all__) <= public_attributes(mod)
    for attr in mod.__all__:
        value = getattr(mod, attr)
        if inspect.isclass(value) or inspect.isfunction(value):
            assert (own_docstring(value) or "").strip(), f"{name}.{attr} has no docstring"
