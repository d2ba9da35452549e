"""Key building in one place: ``{prefix}:{kind}:{{name}}[:suffix]``, with Cluster hash tags.

The name sits inside ``{...}`` so every key that one script touches for that name (lease, fence,
signal) hashes to the same Cluster slot. Braces are therefore refused inside names and prefixes,
which also makes the mapping from (kind, name) to key injective: no name can reach another
namespace or another name's keys.
"""

from __future__ import annotations

import unicodedata

from ._errors import ConfigError

__all__ = ["MAX_NAME_LENGTH", "KeySpace", "validate_name"]

MAX_NAME_LENGTH = 1024
_FORBIDDEN = frozenset("{}")


def validate_name(name: object, *, what: str = "name") -> str:
    """Return ``name`` if it is a usable key component, else raise ``ConfigError``.

    A name is a non-empty ``str`` of at most 1024 characters, with no control characters and no
    braces (reserved for Cluster hash tags).
    """
    if not isinstance(name, str):
        raise ConfigError(f"{what} must be a str, got {type(name).__name__}: {name!r:.80}")
    if not name:
        raise ConfigError(f"{what} must not be empty")
    if len(name) > MAX_NAME_LENGTH:
        raise ConfigError(f"{what} is {len(name)} characters long; the limit is {MAX_NAME_LENGTH}")
    for ch in name:
        if ch in _FORBIDDEN:
            raise ConfigError(
                f"{what} {name!r:.80} contains {ch!r}, reserved for Cluster hash tags"
            )
        if unicodedata.category(ch) in ("Cc", "Cs"):
            raise ConfigError(f"{what} {name!r:.80} contains the control character {ch!r}")
    return name


class KeySpace:
    """Builds every Redis key distkit uses under one ``prefix``."""

    __slots__ = ("prefix",)

    def __init__(self, prefix: str = "distkit") -> None:
        self.prefix = validate_name(prefix, what="key prefix")

    def key(self, kind: str, name: str, *suffix: str) -> str:
        """The key for ``name`` of ``kind`` (``lock``, ``cache``...), hash-tagged on the name."""
        base = f"{self.prefix}:{kind}:{{{name}}}"
        return base + "".join(":" + s for s in suffix) if suffix else base

    def __repr__(self) -> str:
        return f"KeySpace({self.prefix!r})"
