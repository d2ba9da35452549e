"""Key building: name validation, the key format, injectivity and Cluster slot co-location."""

from __future__ import annotations

import unicodedata
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from redis.crc import key_slot

from distkit import ConfigError, KeySpace, validate_name
from distkit._keys import MAX_NAME_LENGTH

# Valid names: any text without braces, control characters or lone surrogates.
names = st.text(
    alphabet=st.characters(blacklist_categories=("Cc", "Cs"), blacklist_characters="{}"),
    min_size=1,
    max_size=40,
)
# Kinds and suffixes are chosen by distkit itself: brace-free and colon-free.
parts = st.text(
    alphabet=st.characters(blacklist_categories=("Cc", "Cs"), blacklist_characters="{}:"),
    max_size=8,
)
kinds = parts.filter(bool)
suffixes = st.lists(parts, max_size=3).map(tuple)


def slot(key: str) -> int:
    return int(key_slot(key.encode()))


def parse(prefix: str, key: str) -> tuple[str, str, tuple[str, ...]]:
    """The inverse of ``KeySpace(prefix).key``, for brace- and colon-free kinds and suffixes."""
    assert key.startswith(prefix + ":")
    rest = key[len(prefix) + 1 :]
    kind, _, rest = rest.partition(":{")
    name, _, rest = rest.partition("}")
    suffix = tuple(rest.split(":")[1:]) if rest else ()
    assert rest == "".join(":" + s for s in suffix)
    return kind, name, suffix


# -- validate_name ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "orders",
        "a",
        "with space and : colons / slashes",
        "ünïcödé-名前-🔒",
        "x" * MAX_NAME_LENGTH,
        "名" * MAX_NAME_LENGTH,  # the limit counts characters, not bytes
        "tab-free\u00a0nbsp",
    ],
)
def test_validate_name_accepts(name: str) -> None:
    assert validate_name(name) is name


@pytest.mark.parametrize("name", [None, 1, 1.5, b"bytes", ["list"], object()])
def test_validate_name_rejects_non_str(name: Any) -> None:
    with pytest.raises(ConfigError, match="must be a str"):
        validate_name(name)


def test_validate_name_rejects_empty() -> None:
    with pytest.raises(ConfigError, match="empty"):
        validate_name("")


def test_validate_name_rejects_too_long() -> None:
    with pytest.raises(ConfigError, match=str(MAX_NAME_LENGTH)) as info:
        validate_name("y" * (MAX_NAME_LENGTH + 1))
    assert len(str(info.value)) < 300  # the name itself is not echoed in full


@pytest.mark.parametrize(
    "name",
    ["line\nbreak", "nul\x00", "del\x7f", "tab\t", "cr\r", "esc\x1b[0m", "c1\x85", "lone\ud800"],
)
def test_validate_name_rejects_control_characters(name: str) -> None:
    with pytest.raises(ConfigError, match="control character"):
        validate_name(name)


@pytest.mark.parametrize("name", ["{tag}", "a{b", "a}b", "x}:lock:{y"])
def test_validate_name_rejects_braces(name: str) -> None:
    with pytest.raises(ConfigError, match="hash tag"):
        validate_name(name)


def test_validate_name_error_names_what() -> None:
    with pytest.raises(ConfigError, match="lock name"):
        validate_name("", what="lock name")
    with pytest.raises(ValueError, match="cache key"):
        validate_name(7, what="cache key")


def test_validation_error_message_is_bounded_for_huge_names() -> None:
    with pytest.raises(ConfigError) as info:
        validate_name("{" + "z" * 10_000)
    assert len(str(info.value)) < 300


@given(st.text(max_size=30))
def test_validate_name_matches_its_rules(name: str) -> None:
    ok = bool(name) and not any(
        ch in "{}" or unicodedata.category(ch) in ("Cc", "Cs") for ch in name
    )
    if ok:
        assert validate_name(name) == name
    else:
        with pytest.raises(ConfigError):
            validate_name(name)


# -- KeySpace ---------------------------------------------------------------------------------


def test_key_format() -> None:
    ks = KeySpace("app")
    assert ks.key("lock", "orders") == "app:lock:{orders}"
    assert ks.key("lock", "orders", "fence") == "app:lock:{orders}:fence"
    assert ks.key("lock", "orders", "wake", "abc") == "app:lock:{orders}:wake:abc"
    assert KeySpace().key("cache", "n") == "distkit:cache:{n}"
    assert KeySpace().prefix == "distkit"
    assert repr(ks) == "KeySpace('app')"


@pytest.mark.parametrize("prefix", ["", "a{b", "x}", "nl\n", 5])
def test_prefix_is_validated(prefix: Any) -> None:
    with pytest.raises(ConfigError, match="key prefix"):
        KeySpace(prefix)


@given(
    prefix=names,
    triples=st.lists(st.tuples(kinds, names, suffixes), unique=True, min_size=1, max_size=12),
)
def test_keys_are_injective(prefix: str, triples: list[tuple[str, str, tuple[str, ...]]]) -> None:
    ks = KeySpace(prefix)
    keys = [ks.key(kind, name, *suffix) for kind, name, suffix in triples]
    assert len(set(keys)) == len(triples)
    for key, triple in zip(keys, triples, strict=True):
        assert parse(prefix, key) == triple


@given(kind=kinds, name=names, other=names)
def test_a_name_cannot_reach_another_names_keys(kind: str, name: str, other: str) -> None:
    ks = KeySpace("p")
    if name != other:
        assert ks.key(kind, name) != ks.key(kind, other)
        assert ks.key(kind, name, "fence") != ks.key(kind, other)
        assert not ks.key(kind, other).startswith(ks.key(kind, name) + ":")


@given(prefix=names, name=names, kind=kinds, suffix_a=suffixes, suffix_b=suffixes)
def test_all_keys_of_one_name_share_a_slot(
    prefix: str, name: str, kind: str, suffix_a: tuple[str, ...], suffix_b: tuple[str, ...]
) -> None:
    ks = KeySpace(prefix)
    first = ks.key(kind, name, *suffix_a)
    second = ks.key(kind, name, *suffix_b)
    assert slot(first) == slot(second) == int(key_slot(name.encode()))


def test_lock_key_family_shares_a_slot() -> None:
    ks = KeySpace()
    family = [ks.key("lock", "orders", *s) for s in [(), ("fence",), ("queue",), ("wake", "x")]]
    assert len({slot(k) for k in family}) == 1


def test_different_names_spread_over_slots() -> None:
    ks = KeySpace()
    slots = {slot(ks.key("lock", f"resource-{i}")) for i in range(300)}
    assert len(slots) > 250  # nearly all distinct
    # and they land in every third of the slot space (every master of a 3-node cluster)
    assert {s * 3 // 16384 for s in slots} == {0, 1, 2}
