"""The cache history checker (issue 9 point 2): hand-made histories, each breaking one rule, must
be caught; their clean twins must pass. Plus a property: histories generated from a sequential
reference model pass, and making any one hit return an older value is caught.

Times in these histories are in milliseconds (``ev`` converts them to monotonic ns).
"""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from distkit.testing import CheckResult, check_cache
from tests._adversarial import fuzz_settings

MS = 1_000_000


def ev(process: str, op: str, type_: str, at: float, **fields: Any) -> dict[str, Any]:
    return {"process": process, "op": op, "type": type_, "time": round(at * MS), **fields}


def op(
    process: str, name: str, start: float, end: float, outcome: str = "ok", **fields: Any
) -> list[dict[str, Any]]:
    return [ev(process, name, "invoke", start, **fields), ev(process, name, outcome, end, **fields)]


def write(p: str, start: float, end: float, key: str, value: Any, **f: Any) -> list[dict[str, Any]]:
    return op(p, "write", start, end, key=key, value=value, **f)


def fill(p: str, start: float, end: float, key: str, value: Any, **f: Any) -> list[dict[str, Any]]:
    return op(p, "fill", start, end, key=key, value=value, **f)


def read(p: str, start: float, end: float, key: str, value: Any, **f: Any) -> list[dict[str, Any]]:
    fields = {"key": key, **f}
    return [
        ev(p, "read", "invoke", start, **fields),
        ev(p, "read", "ok", end, value=value, hit=value is not None, **fields),
    ]


def kinds(result: CheckResult) -> list[str]:
    return [v.kind for v in result.violations]


# -- clean histories ------------------------------------------------------------------------------
def test_a_clean_history_passes() -> None:
    history = [
        *write("p1", 0, 1, "k", "v1", tags=["t"]),
        *read("p2", 2, 3, "k", "v1"),
        *op("p1", "invalidate", 4, 5, tag="t"),
        *read("p2", 6, 7, "k", None),  # a miss is never a violation
        *fill("p2", 8, 9, "k", "v2"),
        *read("p3", 10, 11, "k", "v2"),
        *op("p1", "delete", 12, 13, key="k"),
        *read("p3", 14, 15, "k", None),
    ]
    result = check_cache(history)
    assert result.ok, result.summary()
    assert result.stats == {"reads": 4, "hits": 2, "writes": 2, "invalidations": 2}


def test_a_read_concurrent_with_the_invalidation_may_see_the_old_value() -> None:
    history = [
        *write("p1", 0, 1, "k", "v1"),
        *op("p1", "delete", 4, 10, key="k"),
        *read("p2", 5, 12, "k", "v1"),  # invoked before the delete completed
    ]
    assert check_cache(history).ok


def test_a_write_concurrent_with_the_invalidation_may_survive_it() -> None:
    history = [
        *op("p1", "invalidate", 4, 10),  # namespace
        *write("p2", 5, 11, "k", "v1"),  # born at 11, after the clear began
        *read("p3", 20, 21, "k", "v1"),
    ]
    assert check_cache(history).ok


# -- each rule, broken ---------------------------------------------------------------------------
def test_catches_a_read_after_a_key_invalidation() -> None:
    history = [
        *write("p1", 0, 1, "k", "old"),
        *op("p1", "delete", 2, 3, key="k"),
        *read("p2", 4, 5, "k", "old"),
    ]
    result = check_cache(history)
    assert kinds(result) == ["stale-read"]
    text = result.violations[0].description
    assert "p2 read 'old' from key 'k'" in text and "invalidation of the key" in text


def test_catches_a_read_after_a_tag_invalidation_only_for_tagged_entries() -> None:
    base = [
        *write("p1", 0, 1, "tagged", "a", tags=["t1", "t2"]),
        *write("p0", 0, 1, "untagged", "b", tags=["t1"]),
        *op("p1", "invalidate", 2, 3, tag="t2"),
    ]
    assert check_cache([*base, *read("p2", 4, 5, "untagged", "b")]).ok
    result = check_cache([*base, *read("p2", 4, 5, "tagged", "a")])
    assert kinds(result) == ["stale-read"]
    assert "invalidation of tag 't2'" in result.violations[0].description


def test_catches_a_read_after_a_namespace_clear_only_in_that_namespace() -> None:
    base = [
        *write("p1", 0, 1, "k", "a", namespace="users"),
        *write("p0", 0, 1, "k", "b", namespace="orders"),
        *op("p1", "invalidate", 2, 3, namespace="users"),
    ]
    assert check_cache([*base, *read("p2", 4, 5, "k", "b", namespace="orders")]).ok
    result = check_cache([*base, *read("p2", 4, 5, "k", "a", namespace="users")])
    assert kinds(result) == ["stale-read"]
    assert "clear of the namespace" in result.violations[0].description
    assert "namespace 'users'" in result.violations[0].description


def test_catches_a_fill_that_began_before_the_invalidation() -> None:
    """C1's race: the loader read old data, the invalidation ran, then the fill was accepted."""
    stale_fill = [
        *fill("p1", 0, 10, "k", "computed-from-old-data"),
        *op("p2", "delete", 2, 3, key="k"),
        *read("p3", 11, 12, "k", "computed-from-old-data"),
    ]
    assert kinds(check_cache(stale_fill)) == ["stale-read"]
    refused = [*stale_fill[:2], ev("p1", "fill", "fail", 10), *stale_fill[2:4]]
    assert check_cache(refused).ok  # the same race with the fill refused
    late = [
        *op("p2", "delete", 2, 3, key="k"),
        *fill("p1", 4, 10, "k", "fresh"),
        *read("p3", 11, 12, "k", "fresh"),
    ]
    assert check_cache(late).ok


def test_catches_a_register_going_back_in_time() -> None:
    history = [
        *write("p1", 0, 1, "k", "v1"),
        *write("p2", 2, 3, "k", "v2"),
        *read("p3", 4, 5, "k", "v1"),
    ]
    result = check_cache(history)
    assert kinds(result) == ["overwritten-read"]
    assert "later write of the key by p2" in result.violations[0].description
    concurrent = [*write("p1", 0, 3, "k", "v1"), *write("p2", 1, 2, "k", "v2")]
    assert check_cache([*concurrent, *read("p3", 4, 5, "k", "v1")]).ok


def test_catches_a_phantom_value() -> None:
    history = [*write("p1", 0, 1, "k", "v1"), *read("p2", 2, 3, "k", "never-written")]
    assert kinds(check_cache(history)) == ["phantom-read"]
    other_key = [*write("p1", 0, 1, "a", "v1"), *read("p2", 2, 3, "b", "v1")]
    assert kinds(check_cache(other_key)) == ["phantom-read"]


def test_catches_a_read_past_the_ttl() -> None:
    history = [*write("p1", 0, 1, "k", "v", ttl=0.1), *read("p2", 50, 51, "k", "v")]
    assert check_cache(history).ok
    late = [*write("p1", 0, 1, "k", "v", ttl=0.1), *read("p2", 120, 121, "k", "v")]
    result = check_cache(late)
    assert kinds(result) == ["expired-read"]
    assert "after its ttl of 0.1 s" in result.violations[0].description


def test_near_cache_bound() -> None:
    base = [*write("p1", 0, 1, "k", "v"), *op("p2", "delete", 2, 3, key="k")]
    within = [*base, *read("p3", 30, 31, "k", "v", tier="near")]
    beyond = [*base, *read("p3", 80, 81, "k", "v", tier="near")]
    assert check_cache(within, near_bound=0.05).ok
    result = check_cache(beyond, near_bound=0.05)
    assert kinds(result) == ["stale-read"]
    assert "(near cache)" in result.violations[0].description
    assert "allowed staleness 0.05 s" in result.violations[0].description
    # the bound is the near cache's only: a Redis read 30 ms late is still stale
    assert kinds(check_cache([*base, *read("p3", 30, 31, "k", "v")], near_bound=0.05)) == [
        "stale-read"
    ]
    assert check_cache([*base, *read("p3", 30, 31, "k", "v")], bound=0.05).ok


def test_failed_and_unknown_invalidations_do_not_count() -> None:
    history = [
        *write("p1", 0, 1, "k", "v"),
        *op("p2", "delete", 2, 3, "fail", key="k"),
        *op("p2", "invalidate", 4, 5, "info"),
        ev("p3", "invalidate", "invoke", 6),  # never completed
        *read("p4", 10, 11, "k", "v"),
    ]
    assert check_cache(history).ok


def test_a_write_of_unknown_outcome_is_never_provably_old() -> None:
    history = [
        *op("p1", "write", 0, 1, "info", key="k", value="maybe"),
        *op("p2", "delete", 2, 3, key="k"),
        *read("p3", 4, 5, "k", "maybe"),  # the write may have landed after the delete
    ]
    assert check_cache(history).ok


def test_explicit_born_field_overrides() -> None:
    history = [
        *write("p1", 5, 6, "k", "v", born=1 * MS),  # computed at 1 ms, stored at 6 ms
        *op("p2", "delete", 2, 3, key="k"),
        *read("p3", 7, 8, "k", "v"),
    ]
    assert kinds(check_cache(history)) == ["stale-read"]


def test_json_values_compare_by_content() -> None:
    history = [
        *write("p1", 0, 1, "k", {"a": [1, 2]}),
        *op("p2", "delete", 2, 3, key="k"),
        *read("p3", 4, 5, "k", {"a": [1, 2]}),
    ]
    assert kinds(check_cache(history)) == ["stale-read"]


# -- property: a sequential model's histories pass; an injected stale value is caught -----------
OPS = st.lists(
    st.one_of(
        st.tuples(st.just("set"), st.sampled_from("ab"), st.sampled_from(["t", "u", None])),
        st.tuples(st.just("get"), st.sampled_from("ab"), st.none()),
        st.tuples(st.just("delete"), st.sampled_from("ab"), st.none()),
        st.tuples(st.just("tag"), st.sampled_from(["t", "u"]), st.none()),
        st.tuples(st.just("clear"), st.none(), st.none()),
    ),
    min_size=1,
    max_size=30,
)


def _model_history(ops: list[tuple[Any, Any, Any]]) -> list[dict[str, Any]]:
    """Run ``ops`` one after the other against a dict (the reference model); return the history."""
    store: dict[str, tuple[str, Any]] = {}
    history: list[dict[str, Any]] = []
    t = 0.0
    for i, (kind, arg, tag) in enumerate(ops):
        start, end, t = t + 1, t + 2, t + 3
        if kind == "set":
            store[arg] = (f"v{i}", tag)
            history += write("p", start, end, arg, f"v{i}", tags=[tag] if tag else [])
        elif kind == "get":
            hit = store.get(arg)
            history += read("q", start, end, arg, hit[0] if hit else None)
        elif kind == "delete":
            store.pop(arg, None)
            history += op("p", "delete", start, end, key=arg)
        elif kind == "tag":
            store = {k: v for k, v in store.items() if v[1] != arg}
            history += op("p", "invalidate", start, end, tag=arg)
        else:
            store.clear()
            history += op("p", "invalidate", start, end)
    return history


@fuzz_settings(150)
@given(ops=OPS, pick=st.integers(0, 10**6))
def test_model_histories_pass_and_injected_staleness_is_caught(
    ops: list[tuple[Any, Any, Any]], pick: int
) -> None:
    history = _model_history(ops)
    result = check_cache(history)
    assert result.ok, result.summary()
    # replace one hit's value with a value that key held before: always a violation
    hits = [i for i, e in enumerate(history) if e["op"] == "read" and e["type"] == "ok"]
    hits = [i for i in hits if history[i].get("value") is not None]
    for i in hits:
        key = history[i]["key"]
        earlier = [
            e["value"]
            for e in history[:i]
            if e["op"] == "write" and e["type"] == "ok" and e["key"] == key
            and e["value"] != history[i]["value"]
        ]  # fmt: skip
        if not earlier:
            continue
        mutated = [dict(e) for e in history]
        mutated[i]["value"] = earlier[pick % len(earlier)]
        assert not check_cache(mutated).ok, (ops, i)


def test_testing_doc_examples_run() -> None:
    """The Python blocks of docs/testing.md run (they need no server)."""
    import re
    from pathlib import Path

    doc = Path(__file__).resolve().parent.parent / "docs" / "testing.md"
    blocks = re.findall(r"```python\n(.*?)```", doc.read_text(), re.S)
    assert blocks
    for i, code in enumerate(blocks):
        exec(compile(code, f"docs/testing.md[python block {i}]", "exec"), {})
