"""Facts about the machine and the software a run measured, recorded beside every figure."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import redis

import distkit

__all__ = ["machine_facts", "package_dirs"]

_PEERS = ("python-redis-lock", "pottery", "dogpile.cache", "cashews", "aiocache")


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as info:
            for line in info:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _usable_cpus() -> int | None:
    getter = getattr(os, "sched_getaffinity", None)
    return len(getter(0)) if getter is not None else os.cpu_count()


def _git() -> str | None:
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True, timeout=5, check=True,
        ).stdout.strip()  # fmt: skip
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=5, check=True,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{head}{' (dirty)' if dirty else ''}"


def package_dirs() -> dict[str, str]:
    """Where this process imported our packages from (a ``--baseline`` child: the baseline's)."""
    dirs = {}
    for name in ("distkit", "distlock", "distcache"):
        module = sys.modules.get(name)
        where = getattr(module, "__file__", None)
        if where is not None:
            dirs[name] = str(Path(where).resolve().parent)
    return dirs


def machine_facts(redis_server: str) -> dict[str, Any]:
    """CPU, platform, Python, redis-py, hiredis, redis-server, peers, date and git commit."""
    from redis.utils import HIREDIS_AVAILABLE

    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "cpu_count": os.cpu_count(),
        "cpus_usable": _usable_cpus(),
        "cpu_model": _cpu_model(),
        "platform": platform.platform(),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "redis_py": redis.__version__,
        "hiredis": _version("hiredis"),
        "hiredis_parser_in_use": bool(HIREDIS_AVAILABLE),
        "redis_server": redis_server,
        "distkit": _version("distkit") or distkit.__version__,
        "peers": {name: _version(name) for name in _PEERS},
        "git": _git(),
    }
