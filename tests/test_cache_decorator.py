"""``@cached`` on functions, coroutine functions and methods: signatures kept, canonical keys
(bound arguments, defaults applied), no collisions between different arguments, ``invalidate``
and ``key_for``."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import enum
import hashlib
import inspect
import itertools
import typing
from collections import OrderedDict, namedtuple
from collections.abc import Iterator, Mapping
from decimal import Decimal
from fractions import Fraction
from typing import Annotated, Any, ClassVar, Optional

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from distcache import AsyncCache, Cache, ConfigError, SerializationError, cached, register_unkeyed
from distcache._keys import call_key
from distkit import connect
from distkit.testing import RedisServer, free_port

MISSING = object()


_FRESH = itertools.count()


@pytest.fixture
def cache(r: redis.Redis) -> Cache:
    return Cache(r, namespace="deco")


def test_a_plain_function_keeps_its_signature_and_is_called_once_per_key(cache: Cache) -> None:
    calls: list[tuple[int, int]] = []

    @cached(cache, ttl=60)
    def add(a: int, b: int = 2, *, scale: int = 1) -> int:
        """Add, then scale."""
        calls.append((a, b))
        return (a + b) * scale

    assert add.__name__ == "add" and add.__doc__ == "Add, then scale."
    assert str(inspect.signature(add)) == "(a: 'int', b: 'int' = 2, *, scale: 'int' = 1) -> 'int'"
    assert not inspect.iscoroutinefunction(add)
    assert add(1) == add(1, 2) == add(a=1, b=2) == add(1, b=2, scale=1) == 3
    assert calls == [(1, 2)]  # one canonical key for all four spellings
    assert add(1, scale=2) == 6
    assert add.key_for(1) == add.key_for(a=1, b=2, scale=1)
    assert add.key_for(1) == f"{add.__module__}.{add.__qualname__}:(a=n1,b=n2,scale=n1)"
    assert add.invalidate(1) is True
    assert add.invalidate(1) is False
    assert add(a=1) == 3
    assert calls == [(1, 2), (1, 2), (1, 2)]
    with pytest.raises(TypeError):
        add()  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        add(1, 2, 3)  # type: ignore[call-arg]


def test_a_coroutine_function(redis_server: RedisServer) -> None:
    async def run() -> None:
        client = redis_server.async_client()
        acache = AsyncCache(client, namespace="adeco")
        calls: list[int] = []

        @cached(acache, tags=["users"])
        async def user(uid: int) -> dict[str, int]:
            calls.append(uid)
            await asyncio.sleep(0)
            return {"id": uid}

        assert inspect.iscoroutinefunction(user)
        assert await user(1) == await user(uid=1) == {"id": 1}
        assert calls == [1]
        assert await user.invalidate(1) is True
        await user(1)
        await acache.invalidate_tags("users")
        await user(1)
        assert calls == [1, 1, 1]
        assert await acache.get(user.key_for(1)) == {"id": 1}
        await client.aclose()

    redis_server.client().flushall()
    asyncio.run(run())


def test_methods_exclude_self_from_the_key(cache: Cache) -> None:
    class Users:
        loads: ClassVar[list[tuple[str, int]]] = []

        def __init__(self, db: str) -> None:
            self.db = db

        @cached(cache)
        def get(self, uid: int, full: bool = False) -> str:
            Users.loads.append((self.db, uid))
            return f"user {uid}"

        @classmethod
        @cached(cache)
        def count(cls, kind: str) -> int:
            return len(kind)

    a, b = Users("a"), Users("b")
    assert a.get(1) == b.get(1) == "user 1"
    assert Users.loads == [("a", 1)]  # instances share the entry: self is not in the key
    key = a.get.key_for(1)
    # the class-level forms are typed without the instance; at run time it may be passed too
    assert key == b.get.key_for(1) == Users.get.key_for(1) == Users.get.key_for(a, 1)  # type: ignore[arg-type]
    assert key.endswith(".Users.get:(uid=n1,full=n0)")
    assert a.get.invalidate(1) is True  # through the instance
    a.get(1)
    assert Users.get.invalidate(b, uid=1) is True  # type: ignore[arg-type,misc]  # with one
    a.get(1)
    assert Users.get.invalidate(1) is True  # through the class, without one
    # type checkers do not bind cls through a decorator object under @classmethod
    assert Users.count("abc") == 3 == Users.count("abc")  # type: ignore[call-arg,arg-type]
    assert Users.count.key_for("abc") == Users.count.key_for(Users, "abc")  # type: ignore[call-arg,arg-type]
    assert Users.count.invalidate("abc") is True
    assert str(inspect.signature(a.get)) == "(uid: 'int', full: 'bool' = False) -> 'str'"


def _plain_self(self: int, x: int) -> int:  # a plain function that names its first parameter self
    return self * 100 + x


def test_a_plain_function_keys_a_first_parameter_named_self_or_cls(cache: Cache) -> None:
    """Only a real method drops its first argument from the key: a function whose first
    parameter is merely named ``self`` / ``cls`` keys it like any other argument."""
    f = cached(cache)(_plain_self)
    assert (f(1, 2), f(3, 2)) == (102, 302)  # not the first call's entry
    assert f.key_for(1, 2) != f.key_for(3, 2)
    assert f.key_for(1, 2).endswith("._plain_self:(self=n1,x=n2)")

    def by_cls(cls: str, n: int) -> str:  # a local function: no class around it
        return cls * n

    g = cached(cache)(by_cls)
    assert (g("a", 2), g("b", 2)) == ("aa", "bb")
    assert g.invalidate("a", 2) is True
    assert g.key_for("a", 2) != g.key_for("b", 2)


class _Statics:
    """A module-level class (its static methods can be looked up by name)."""

    calls: ClassVar[list[tuple[int, int, int]]] = []

    @staticmethod
    def scaled(self: int, x: int, y: int = 0) -> int:
        _Statics.calls.append((self, x, y))
        return self * x + y


def test_a_module_level_staticmethod_with_defaults_keys_its_first_argument(cache: Cache) -> None:
    scaled = cached(cache)(_Statics.__dict__["scaled"].__func__)
    _Statics.scaled = staticmethod(scaled)  # type: ignore[assignment]
    assert (_Statics.scaled(2, 5), _Statics.scaled(3, 5)) == (10, 15)
    # invalidate(2, 5) names the call scaled(2, 5), not scaled(<no self>, 2, 5)
    assert _Statics.scaled.key_for(2, 5) == scaled.key_for(2, 5)
    assert "self=n2" in scaled.key_for(2, 5)
    assert _Statics.scaled.invalidate(2, 5) is True  # type: ignore[attr-defined]
    assert _Statics.scaled(2, 5) == 10
    assert _Statics.calls == [(2, 5, 0), (3, 5, 0), (2, 5, 0)]


def test_a_staticmethod_keys_a_first_parameter_named_self(cache: Cache) -> None:
    class Tool:
        @staticmethod
        @cached(cache)
        def combine(self: int, x: int) -> int:
            return self * 100 + x

        @cached(cache)
        def real(self, x: int) -> int:
            return x

    assert (Tool.combine(1, 2), Tool.combine(3, 2)) == (102, 302)
    tool = Tool()
    assert (tool.combine(1, 2), tool.combine(3, 2)) == (102, 302)
    assert Tool.combine.key_for(1, 2) != Tool.combine.key_for(3, 2)
    assert Tool.combine.invalidate(3, 2) is True  # the entry its calls used
    # an instance of the class as the static method's first argument is an argument too (it
    # has no canonical form: refused, not dropped)
    with pytest.raises(SerializationError, match="argument 'self'"):
        Tool.combine.key_for(tool, 2)  # type: ignore[arg-type]
    assert tool.real(5) == 5
    assert Tool.real.key_for(5) == tool.real.key_for(5) == Tool.real.key_for(tool, 5)  # type: ignore[arg-type]


def test_a_subclass_override_calling_super_shares_the_method_entries(cache: Cache) -> None:
    class Base:
        calls: ClassVar[list[int]] = []

        @cached(cache)
        def get(self, uid: int) -> str:
            Base.calls.append(uid)
            return f"user {uid}"

    class Child(Base):
        def get(self, uid: int) -> str:
            return super().get(uid) + "!"

    assert Child().get(1) == "user 1!"
    assert Base().get(1) == "user 1"
    assert Base.calls == [1]  # the instance is not part of the key, through super() too


def test_typed_distinguishes_equal_values_of_different_types(cache: Cache) -> None:
    loose_calls: list[Any] = []
    typed_calls: list[Any] = []

    @cached(cache)
    def loose(x: Any) -> str:
        loose_calls.append(x)
        return repr(x)

    @cached(cache, typed=True)
    def strict(x: Any) -> str:
        typed_calls.append(x)
        return repr(x)

    for value in (1, 1.0, True):
        loose(value)
        strict(value)
    assert loose_calls == [1]  # 1 == 1.0 == True, as functools.lru_cache(typed=False)
    assert typed_calls == [1, 1.0, True]
    loose("1")
    loose(b"1")
    assert loose_calls == [1, "1", b"1"]  # equal-looking but unequal values never share


def test_version_key_function_tags_and_ttl(cache: Cache, r: redis.Redis) -> None:
    @cached(cache, version=2, tags=lambda uid: [f"user:{uid}", "users"], ttl=30)
    def profile(uid: int) -> str:
        return f"p{uid}"

    @cached(cache, key=lambda uid: f"profile-v1:{uid}")
    def legacy(uid: int) -> str:
        return f"l{uid}"

    assert profile.key_for(3).endswith(".profile@2:(uid=n3)")
    assert profile(3) == "p3"
    assert 29_000 < r.pttl(f"distkit:cache:{{deco}}:k:{profile.key_for(3)}") <= 30_000
    cache.invalidate_tags("user:4")
    assert cache.get(profile.key_for(3)) == "p3"
    cache.invalidate_tags("user:3")
    assert cache.get(profile.key_for(3), MISSING) is MISSING
    assert legacy(5) == "l5" and legacy.key_for(5) == "profile-v1:5"
    assert cache.get("profile-v1:5") == "l5"


def test_repeated_calls_reuse_their_key(cache: Cache, r: redis.Redis) -> None:
    calls: list[Any] = []

    @cached(cache)
    def f(x: Any, y: int = 0) -> str:
        calls.append(x)
        return repr(x)

    for x in (1, 1, True, 1.0, "1", [1], [1], (1,)):
        f(x)
    assert calls == [1, "1", [1], (1,)]  # equal values share an entry, memoized or not
    keys = {k for k in r.keys("*:k:*") if isinstance(k, bytes)}
    assert keys == {
        f"distkit:cache:{{deco}}:k:{f.key_for(x)}".encode() for x in (1, "1", [1], (1,))
    }

    @cached(cache, typed=True)
    def g(x: Any) -> str:
        calls.append(x)
        return repr(x)

    calls.clear()
    for x in (1, True, 1.0, 1):
        g(x)
    assert calls == [1, True, 1.0]  # typed keys are never memoized by Python equality

    @dataclasses.dataclass(eq=False)  # hashed by identity, but keyed by its fields
    class Query:
        text: str

    calls.clear()
    query = Query("a")
    f(query)
    query.text = "b"
    f(query)
    assert calls == [query, query]  # the mutated argument got a new key: no stale hit


def test_long_keys_are_hashed(cache: Cache, r: redis.Redis) -> None:
    @cached(cache)
    def search(query: str) -> int:
        return len(query)

    query = "q" * 500
    assert search(query) == 500
    key = search.key_for(query)
    digest = hashlib.sha256(key.encode()).hexdigest()
    assert r.exists(f"distkit:cache:{{deco}}:h:{digest}") == 1
    assert search(query) == 500


def test_negative_ttl_for_none_results(cache: Cache, r: redis.Redis) -> None:
    calls: list[int] = []

    @cached(cache, negative_ttl=0.5)
    def find(uid: int) -> str | None:
        calls.append(uid)
        return None

    assert find(1) is None and find(1) is None
    assert calls == [1]
    assert 0 < r.pttl(f"distkit:cache:{{deco}}:k:{find.key_for(1)}") <= 500


def test_arguments_without_a_canonical_form_are_refused(cache: Cache) -> None:
    class Conn:
        pass

    @cached(cache)
    def query(conn: Any, sql: str) -> int:
        return 1

    with pytest.raises(SerializationError, match=r"argument 'conn'.*Conn"):
        query(Conn(), "select 1")
    loop: list[Any] = []
    loop.append(loop)
    with pytest.raises(SerializationError, match="contains itself"):
        query(loop, "x")


def test_decoration_errors(r: redis.Redis, redis_server: RedisServer) -> None:
    sync_cache = Cache(r)
    async_cache = AsyncCache(redis_server.async_client())
    with pytest.raises(ConfigError, match="AsyncCache"):

        @cached(sync_cache)
        async def a() -> None: ...

    with pytest.raises(ConfigError, match="sync"):

        @cached(async_cache)
        def b() -> None: ...

    with pytest.raises(ConfigError):
        cached(sync_cache, ttl=0)
    with pytest.raises(ConfigError):
        cached(sync_cache, tags="one-tag")
    with pytest.raises(ConfigError):
        cached(sync_cache, version="has space")
    with pytest.raises(ConfigError):
        cached(sync_cache, typed=1)  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        cached("not a cache")  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        cached(sync_cache, key="static")  # type: ignore[arg-type]

    @cached(sync_cache, key=lambda x: 42)  # type: ignore[arg-type,return-value]
    def c(x: int) -> int:
        return x

    with pytest.raises(ConfigError, match="returned int"):
        c(1)


class Later(BaseModel):
    value: int


def test_forward_references_resolve_at_the_first_call(cache: Cache) -> None:
    @cached(cache)
    def make() -> DefinedAfterDecoration:  # type: ignore[name-defined]  # noqa: F821
        return Later(value=1)

    call: Any = make  # (an unresolvable annotation is Any to the type checker)
    globals()["DefinedAfterDecoration"] = Later  # only now can the annotation be resolved
    try:
        assert call() == call() == Later(value=1)
        assert isinstance(call(), Later)
    finally:
        del globals()["DefinedAfterDecoration"]

    @cached(cache)
    def broken() -> NeverDefined:  # type: ignore[name-defined]  # noqa: F821
        return 1

    call = broken
    with pytest.raises(ConfigError, match="value_type"):
        call()


# -- canonical keys: no collisions -------------------------------------------------------------
class Color(enum.Enum):
    RED = 1
    BLUE = "1"


@dataclasses.dataclass(frozen=True)
class Pt:
    x: Any
    y: Any = 0


class Model(BaseModel):
    a: Any
    b: Any = None


Pair = namedtuple("Pair", "left right")

# Strings that look like the encodings of other values: where sloppy key builders collide.
confusable = st.one_of(
    st.sampled_from(["1", "n1", "i1", "b1", "N", "None", "f1.5", "(1,)", "[1]", "'a'", "a,b"]),
    st.text(alphabet="n1if.bN(),[]{}<>:'\"=xE", max_size=8),
)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(2**80), max_value=2**80),
    st.floats(allow_nan=False),
    st.sampled_from([0.0, -0.0, 1.0, 2.0**53, 1e300, 0, 1, 15, -1, 2**53]),
    confusable,
    st.text(max_size=8),
    st.binary(max_size=6),
    st.sampled_from([Color.RED, Color.BLUE, Decimal("1"), dt.date(2020, 1, 1)]),
)
values = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.lists(children, max_size=4).map(tuple),
        st.dictionaries(confusable | st.integers(), children, max_size=4),
        st.frozensets(st.integers() | st.text(max_size=3), max_size=4),
        st.builds(Pt, children, children),
        st.builds(Model, a=children, b=children),
        st.builds(Pair, children, children),
    ),
    max_leaves=12,
)


def typed_equal(a: Any, b: Any) -> bool:
    """Equality that also compares types, recursively (what typed=True keys must separate)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(typed_equal(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(
            any(typed_equal(k, k2) and typed_equal(a[k], b[k2]) for k2 in b if k2 == k) for k in a
        )
    if isinstance(a, (Pt, Model)):
        return typed_equal(list(vars(a).values()), list(vars(b).values()))
    if isinstance(a, frozenset):
        return a == b and all(any(typed_equal(x, y) for y in b) for x in a)
    return bool(a == b)


def untyped_equal(a: Any, b: Any) -> bool:
    try:
        equal = a == b
    except Exception:
        return False
    if isinstance(a, (Pt, Model)) or isinstance(b, (Pt, Model)):  # equal only as the same class
        return type(a) is type(b) and bool(equal)
    return bool(equal) and _same_shape(a, b)


def _same_shape(a: Any, b: Any) -> bool:
    # Python calls [1] != (1,), but Pair(1, 2) == (1, 2) and {1: x} == {True: x}
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return isinstance(a, tuple) == isinstance(b, tuple) and all(
            _same_shape(x, y) for x, y in zip(a, b, strict=True)
        )
    if isinstance(a, dict) and isinstance(b, dict):
        return all(_same_shape(a[k], b[k]) for k in a)
    return True


@settings(max_examples=100, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.lists(st.tuples(values, values), min_size=2, max_size=20))
def test_distinct_argument_tuples_never_share_a_key(calls: list[tuple[Any, Any]]) -> None:
    for typed, equal in ((True, typed_equal), (False, untyped_equal)):
        first: dict[str, tuple[Any, Any]] = {}
        for call in calls:
            key = call_key("f", None, {"x": call[0], "y": call[1]}, typed)
            other = first.setdefault(key, call)
            assert equal(call[0], other[0]) and equal(call[1], other[1]), (typed, key)


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.sampled_from([0, 1, 15, -1, 1.0, 0.5, True, False, None]) | confusable, max_size=40)
)
def test_distinct_scalars_never_share_a_key(xs: list[Any]) -> None:
    for typed, equal in ((True, typed_equal), (False, untyped_equal)):
        first: dict[str, Any] = {}
        for x in xs:
            other = first.setdefault(call_key("f", None, {"x": x}, typed), x)
            assert equal(x, other), (typed, x, other)


@settings(max_examples=200, deadline=None)
@given(values)
def test_equal_values_share_a_key(value: Any) -> None:
    for typed in (True, False):
        copied = _rebuild(value, typed)
        assert call_key("f", None, {"x": value}, typed) == call_key("f", None, {"x": copied}, typed)


def _rebuild(value: Any, typed: bool) -> Any:
    """An equal copy built differently: dicts in reverse insertion order, sets rebuilt, 0.0 as
    -0.0, and (untyped) integral floats as ints and ints as floats."""
    if isinstance(value, dict):
        return {k: _rebuild(value[k], typed) for k in reversed(list(value))}
    if isinstance(value, Pair):
        return Pair(*(_rebuild(v, typed) for v in value))
    if isinstance(value, (list, tuple)):
        return type(value)(_rebuild(v, typed) for v in value)
    if isinstance(value, frozenset):
        return frozenset(reversed(list(value)))
    if type(value) is float:
        if value == 0:
            return -value
        if not typed and value.is_integer():
            return int(value)
    if type(value) is int and not typed and float(value) == value:
        return float(value)
    return value


def test_collision_cases_reported_by_other_libraries() -> None:
    def key(*args: Any, typed: bool = False, **kwargs: Any) -> str:
        return call_key("f", None, {"args": args, "kwargs": kwargs}, typed)

    distinct = [
        key("1"),
        key(1),
        key("a b"),
        key("a", "b"),
        key("a,b"),
        key(None),
        key("None"),
        key([1, 2]),
        key((1, 2)),
        key("[1, 2]"),
        key({"a": 1}),
        key(a=1),
        key(b"x"),
        key("x"),
        key(1.5),
        key("1.5"),
        key(OrderedDict(a=1, b=2)),
        key(OrderedDict(b=2, a=1)),
        key(Color.RED),
        key(Color.BLUE),
    ]
    assert len(set(distinct)) == len(distinct)
    assert key({"a": 1, "b": 2}) == key({"b": 2, "a": 1})
    assert list(frozenset([1, 9])) != list(frozenset([9, 1]))  # iteration order differs...
    assert key(frozenset([1, 9])) == key(frozenset([9, 1])) == key({9, 1})  # ...keys do not
    assert key({1, 9}, typed=True) != key(frozenset([1, 9]), typed=True)
    assert key(1) == key(1.0) == key(True)
    for text, number in (("n1", 1), ("nf", 15), ("1", 1), ("i1", 1), ("N", None)):  # top level
        assert call_key("f", None, {"x": text}, False) != call_key("f", None, {"x": number}, False)
        assert call_key("f", None, {"x": text}, True) != call_key("f", None, {"x": number}, True)
    assert len({key(1, typed=True), key(1.0, typed=True), key(True, typed=True)}) == 3


# -- issue 14 item 4: keys never collide, never depend on call history -----------------------------
def test_lambdas_need_a_name(cache: Cache) -> None:
    """Every lambda of a module is ``module.<lambda>``: double(5) once returned square(5)."""
    with pytest.raises(ConfigError, match="name="):
        cached(cache)(lambda x: 2 * x)
    double = cached(cache, name="test.double")(lambda x: 2 * x)
    square = cached(cache, name="test.square")(lambda x: x * x)
    assert (square(5), double(5)) == (25, 10)
    assert cached(cache, key=lambda x: f"k{x}")(lambda x: 3 * x)(5) == 15


def _multiplier(cache: Cache, n: int, name: str | None = None) -> Any:
    @cached(cache, name=name)
    def mul(x: int) -> int:
        return n * x

    return mul


def test_closures_of_one_factory_need_a_name(cache: Cache) -> None:
    """``factory.<locals>.mul`` is one name for every closure; what they capture is no key."""
    times2 = _multiplier(cache, 2)
    assert times2(5) == 10
    with pytest.raises(ConfigError, match="another function of this namespace"):
        _multiplier(cache, 3)
    del times2  # even once the first closure is gone: its entries are still in Redis
    with pytest.raises(ConfigError, match="another function of this namespace"):
        _multiplier(cache, 3)
    assert _multiplier(cache, 3, name="times3")(5) == 15
    assert _multiplier(cache, 4, name="times4")(5) == 20


def test_one_function_decorated_twice_or_on_two_caches_is_fine(r: redis.Redis) -> None:
    def f(x: int) -> int:
        return x

    one, two = Cache(r, namespace="one"), Cache(r, namespace="two")
    assert cached(one)(f)(1) == cached(one)(f)(1) == cached(two)(f)(1) == 1


class _Open(BaseModel, extra="allow"):
    id: int


def test_pydantic_extra_fields_are_part_of_the_key(cache: Cache) -> None:
    @cached(cache)
    def echo(m: _Open) -> Any:
        return m.model_dump()

    a, b = _Open(id=1, role="admin"), _Open(id=1, role="guest")
    assert a != b and echo.key_for(a) != echo.key_for(b)
    assert echo(a) == {"id": 1, "role": "admin"}
    assert echo(b) == {"id": 1, "role": "guest"}
    assert echo.key_for(_Open(id=1, x=1, y=2)) == echo.key_for(_Open(id=1, y=2, x=1))
    assert echo.key_for(_Open(id=1)) != echo.key_for(_Open(id=1, x=None))


class _Level(enum.IntEnum):
    ONE = 1


class _Word(str, enum.Enum):
    A = "a"


@pytest.mark.parametrize(
    ("plain", "twin"),
    [(1, _Level.ONE), ("a", _Word.A), (1, Decimal(1)), (0.5, Decimal("0.5"))],
    ids=["IntEnum", "str-Enum", "Decimal", "Decimal-float"],
)
def test_the_memo_never_gives_an_equal_value_of_another_type_its_key(
    r: redis.Redis, plain: Any, twin: Any
) -> None:
    """The call key is a function of the argument's type and value, never of call history."""
    calls: list[Any] = []
    cache = Cache(r, namespace=f"memo-{next(_FRESH)}")  # a name is its function's for good

    @cached(cache)
    def ident(x: Any) -> str:
        calls.append(x)
        return type(x).__name__

    assert ident(plain) == type(plain).__name__  # remembered by the memo
    assert ident(twin) == type(twin).__name__  # equal, but another type: its own key
    assert cache.get(ident.key_for(twin), MISSING) == type(twin).__name__
    assert ident.invalidate(twin) is True
    assert ident.invalidate(plain) is True


# -- the generator: canonical keys over many argument types ---------------------------------------
try:
    import numpy as np
except ImportError:  # pragma: no cover - numpy is optional
    np = None


@dataclasses.dataclass(frozen=True)
class _Pt:
    x: Any


def _scalars() -> st.SearchStrategy[Any]:
    options = [
        st.integers(-(2**70), 2**70),
        st.integers(-2, 2),
        st.booleans(),
        st.none(),
        st.sampled_from([*_Level, *_Word, -0.0, 0.0, 1.0, 0.5, "a", "", 1, 0]),
        st.floats(allow_nan=False),
        st.decimals(allow_nan=False, allow_infinity=False),
        st.sampled_from([Decimal(1), Decimal("1.0"), Decimal("0.5"), Decimal(-0)]),
        st.fractions(max_denominator=4),
        st.text(max_size=3),
        st.binary(max_size=2),
    ]
    if np is not None:
        options.append(st.integers(-3, 3).map(np.int64))
        options.append(st.sampled_from([0.5, 1.0, -0.0]).map(np.float64))
        options.append(st.booleans().map(np.bool_))
    return st.one_of(options)


ARGUMENTS = st.recursive(
    _scalars(),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.tuples(inner, inner),
        st.dictionaries(st.text(max_size=2), inner, max_size=3),
        inner.map(_Pt),
        st.dictionaries(st.sampled_from(["p", "q"]), inner, max_size=2).map(
            lambda extra: _Open(id=1, **extra)
        ),
    ),
    max_leaves=6,
)


# Equal in Python, of different types: what a memo keyed by value alone would mix up.
TWINS: list[Any] = [1, True, 1.0, _Level.ONE, Decimal(1), Fraction(1), "a", _Word.A, 0.5,
                    Decimal("0.5"), Fraction(1, 2), 0, False, -0.0, Decimal(0)]  # fmt: skip
if np is not None:
    TWINS += [np.int64(1), np.float64(0.5), np.bool_(True), np.float64(-0.0)]
CALLS = st.one_of(
    st.lists(ARGUMENTS, min_size=1, max_size=6),
    st.lists(st.sampled_from(TWINS), min_size=2, max_size=6),
    st.lists(st.one_of(st.sampled_from(TWINS), ARGUMENTS), min_size=2, max_size=6),
)


def _python_equal(x: Any, y: Any, typed: bool) -> bool:
    """What two arguments that share a key must be: equal (and, typed, of one type)."""
    try:
        return bool(x == y) and (not typed or type(x) is type(y))
    except Exception:  # e.g. numpy's elementwise comparisons
        return False


@settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(values=CALLS, typed=st.booleans())
def test_keys_are_canonical_whatever_the_call_order(
    r: redis.Redis, values: list[Any], typed: bool
) -> None:
    """A key is a function of the argument's type and value: ``key_for(x)`` is the key the call
    used, two orders of the same calls (memo warmed differently) store the same keys, and two
    arguments share a key only if they are equal (``1``, ``1.0``, ``True``: documented)."""
    r.flushall()
    stored: list[set[str]] = []
    run = next(_FRESH)  # each example decorates a new f: a namespace of its own
    for order, ns in ((values, f"canon-a{run}"), (values[::-1], f"canon-b{run}")):
        cache = Cache(r, namespace=ns)
        count = itertools.count(1)

        @cached(cache, typed=typed)
        def f(x: Any) -> int:
            return next(count)  # noqa: B023 - called only within this iteration

        for x in order:
            try:
                got = f(x)
            except SerializationError:
                with pytest.raises(SerializationError):
                    f.key_for(x)  # refused by the call and by key_for alike
                continue
            assert cache.get(f.key_for(x), MISSING) == got, (x, f.key_for(x))
        prefix = f"distkit:cache:{{{ns}}}:"
        stored.append({k.decode()[len(prefix) :] for k in r.scan_iter(prefix + "k:*")})
        keys: dict[str, Any] = {}
        for x in order:
            try:
                key = f.key_for(x)
            except SerializationError:
                continue
            if key in keys:
                assert _python_equal(keys[key], x, typed), (keys[key], x, key)
            keys[key] = x
    assert stored[0] == stored[1]


def _no_wraps(fn: Any) -> Any:
    """A decorator without functools.wraps: everything it wraps is ``_no_wraps.<locals>.inner``."""

    def inner(*args: Any) -> Any:
        return fn(*args)

    return inner


def _ano_wraps(fn: Any) -> Any:
    async def inner(*args: Any) -> Any:
        return await fn(*args)

    return inner


def _twin_pairs(is_async: bool) -> dict[str, Any]:
    """Ways to make two different functions whose derived ``module.qualname`` is the same."""

    def factory(n: int) -> Any:
        if is_async:

            async def amul(x: int) -> int:
                return n * x

            return amul

        def mul(x: int) -> int:
            return n * x

        return mul

    async def adouble(x: int) -> int:
        return 2 * x

    async def asquare(x: int) -> int:
        return x * x

    wrap = _ano_wraps if is_async else _no_wraps
    return {
        "lambdas": None if is_async else (lambda x: 2 * x, lambda x: x * x),
        "factory-closures": (factory(2), factory(3)),
        "decorator-without-wraps": (
            (wrap(adouble), wrap(asquare))
            if is_async
            else (wrap(lambda x: 2 * x), wrap(lambda x: x * x))
        ),
    }


@pytest.mark.parametrize(
    ("how", "is_async"),
    [
        ("lambdas", False),  # a lambda is never a coroutine function
        ("factory-closures", False),
        ("factory-closures", True),
        ("decorator-without-wraps", False),
        ("decorator-without-wraps", True),
    ],
)
def test_functions_sharing_a_derived_name_are_refused_never_mixed(
    r: redis.Redis, redis_server: RedisServer, how: str, is_async: bool
) -> None:
    """Every way two functions get one ``module.qualname``: the second (or, for a lambda, the
    first) is refused with ConfigError; with distinct ``name=`` each gets its own entries."""
    first, second = _twin_pairs(is_async)[how]
    aclient = redis_server.async_client() if is_async else None
    ns = f"twins-{how}-{is_async}"  # the sync and async pairs would collide in one namespace
    cache: Any = AsyncCache(aclient, namespace=ns) if is_async else Cache(r, namespace=ns)
    with pytest.raises(ConfigError, match="name="):
        cached(cache)(first)
        cached(cache)(second)
    one = cached(cache, name=f"{how}.one")(first)
    two = cached(cache, name=f"{how}.two")(second)
    if is_async:

        async def both() -> tuple[int, int]:
            try:
                return await one(5), await two(5)
            finally:
                await cache.aclose()
                await aclient.aclose()  # type: ignore[union-attr]

        assert asyncio.run(both()) in ((10, 15), (10, 25))
    else:
        assert (one(5), two(5)) in ((10, 15), (10, 25))


# -- hostile review of issue 14 item 4: names are claimed per namespace, not per handle ----------
def _square(x: int) -> int:
    return x * x


def _double(x: int) -> int:
    return 2 * x


def _factory(k: int) -> Any:
    def mul(x: int) -> int:
        return k * x

    return mul


# Each case: two decorations (handle index, function, name) that would share entries.
COLLISIONS: dict[str, tuple[tuple[int, Any, str | None], tuple[int, Any, str | None]]] = {
    "name=-equal-to-a-derived-name": (
        (0, _square, None),
        (0, _double, f"{__name__}._square"),
    ),
    "same-name=-twice": ((0, _square, "m.f"), (0, _double, "m.f")),
    "same-name=-twice-lambdas": ((0, lambda x: x + 1, "m.g"), (0, lambda x: x + 100, "m.g")),
    "closures-on-two-handles": ((0, _factory(3), None), (1, _factory(4), None)),
    "closures-with-one-name=-on-two-handles": ((0, _factory(3), "m.h"), (1, _factory(4), "m.h")),
    "name=-on-another-client-of-the-server": ((0, _square, "m.i"), (2, _double, "m.i")),
    # the same server spelled two ways: the check must not depend on the spelling
    "name=-through-localhost-and-127.0.0.1": ((3, _square, "m.j"), (4, _double, "m.j")),
    "closures-through-localhost-and-127.0.0.1": ((3, _factory(5), None), (4, _factory(6), None)),
    # another server: names are claimed per namespace, whatever the server (decided: a client
    # cannot tell two spellings, proxies or aliases of one server apart without asking it)
    "name=-on-another-server": ((0, _square, "m.k"), (5, _double, "m.k")),
}


@pytest.mark.parametrize("case", sorted(COLLISIONS))
def test_a_name_is_refused_across_every_handle_of_the_namespace(
    r: redis.Redis, redis_server: RedisServer, case: str
) -> None:
    """Every way two different functions can end up with one name in one namespace within a
    process is a ConfigError at decoration time, whichever handle each was decorated on."""
    ns = f"claim-{next(_FRESH)}"
    handles = [
        Cache(r, namespace=ns),
        Cache(r, namespace=ns),
        Cache(redis_server.client(), namespace=ns),
        Cache(connect(f"redis://localhost:{redis_server.port}"), namespace=ns),
        Cache(connect(f"redis://127.0.0.1:{redis_server.port}"), namespace=ns),
        Cache(connect({"port": free_port()}), namespace=ns),  # no server: never called
    ]
    (h1, f1, n1), (h2, f2, n2) = COLLISIONS[case]
    kept = cached(handles[h1], name=n1)(f1)  # kept alive: the name stays taken
    with pytest.raises(ConfigError, match="another function of this namespace"):
        cached(handles[h2], name=n2)(f2)
    assert kept(3) == f1(3)
    # what is allowed: the same function again (any handle), or another namespace
    assert cached(handles[1 - h1 if h1 < 2 else 0], name=n1)(f1)(3) == f1(3)
    assert cached(Cache(r, namespace=f"{ns}-other"), name=n2)(f2)(3) == f2(3)


class _Frame(Mapping[str, Any]):
    """A framework object that is also a Mapping (as Starlette's Request is): its items are not
    values (the ASGI scope holds the app, the server's objects...)."""

    def __init__(self, path: str = "/") -> None:
        self.scope = {"path": path, "app": object()}

    def __getitem__(self, key: str) -> Any:
        return self.scope[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.scope)

    def __len__(self) -> int:
        return len(self.scope)


class _Session:
    """A dependency-injected database session, say."""


register_unkeyed(_Frame, _Session)


def test_registered_framework_objects_never_enter_the_key(cache: Cache) -> None:
    """Before register_unkeyed, a Mapping-like framework object was walked item by item, and the
    call failed on every request with a SerializationError naming a type deep inside it."""
    calls: list[int] = []

    @cached(cache)
    def page(request: _Frame, db: _Session | None, item: int) -> int:
        calls.append(item)
        return item * 10

    @cached(cache)
    def unannotated(request, item):  # type: ignore[no-untyped-def]  # Starlette's style
        calls.append(-item)
        return item

    assert page(_Frame("/a"), _Session(), 1) == 10
    assert page(_Frame("/b"), None, item=1) == 10  # another request, no session: same entry
    assert unannotated(_Frame("/a"), 2) == unannotated(_Frame("/b"), 2) == 2
    assert calls == [1, -2]
    key = page.key_for(item=1)  # the framework parameters may be left out...
    assert key.endswith(":(item=n1)")
    assert page.key_for("anything", 3.5, 1) == key  # ...or given anything
    assert unannotated.key_for(_Frame(), 2).endswith(":(item=n2)")
    with pytest.raises(TypeError, match="item"):
        page.key_for(db=None)  # a keyed parameter is still required
    assert page.invalidate(item=1) is True
    assert page(_Frame(), _Session(), 1) == 10 and calls == [1, -2, 1]

    class Pages:
        # an unresolvable return annotation does not hide the request's
        @cached(cache, name="pages-render", value_type=int)
        def render(self, request: _Frame, n: int) -> NeverDefined:  # type: ignore[name-defined]  # noqa: F821
            calls.append(100 + n)
            return n

    assert Pages().render(_Frame(), 5) == 5
    assert (
        Pages.render.key_for(n=5)
        == Pages().render.key_for(n=5)
        == Pages.render.key_for(Pages(), _Frame(), 5)
    )
    assert Pages.render.key_for(n=5).endswith(":(n=n5)")
    assert Pages.render.invalidate(n=5) is True

    @cached(cache)
    def nested(frames: list[_Frame]) -> int:
        return 1

    with pytest.raises(
        SerializationError, match=r"argument 'frames'.*_Frame is a framework object"
    ):
        nested([_Frame()])


def test_unkeyed_annotations_are_recognised_in_every_spelling(cache: Cache) -> None:
    from distcache._keys import unkeyed_annotation

    assert unkeyed_annotation(_Frame) and unkeyed_annotation(_Session | None)
    assert unkeyed_annotation(Optional[_Frame])  # noqa: UP045 - the spelling under test
    assert unkeyed_annotation(Annotated[_Session, "Depends(get_db)"])
    assert not unkeyed_annotation(_Frame | int) and not unkeyed_annotation(int)
    assert not unkeyed_annotation("_Frame") and not unkeyed_annotation(None)

    @cached(cache)
    def f(db: Annotated[_Session, "dependency"], x: int) -> int:  # a string annotation here
        return x

    assert f.key_for(object(), 4).endswith(":(x=n4)")


def test_a_nested_failure_names_the_argument_and_its_type() -> None:
    class Opaque:
        pass

    with pytest.raises(SerializationError, match=r"argument 'x' \(within a builtins.dict\)"):
        call_key("f", None, {"x": {"k": Opaque()}}, False)


def test_register_unkeyed_takes_classes() -> None:
    with pytest.raises(ConfigError, match="classes"):
        register_unkeyed(_Frame())  # type: ignore[arg-type]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.booleans(), values), min_size=1, max_size=5), st.booleans())
def test_unkeyed_arguments_are_left_out_and_refused_when_nested(
    args: list[tuple[bool, Any]], typed: bool
) -> None:
    """A key is the key of the call without its framework objects; nested, one is refused."""
    full = {f"p{i}": _Frame() if frame else v for i, (frame, v) in enumerate(args)}
    kept = {p: v for p, v in full.items() if not isinstance(v, _Frame)}
    assert call_key("f", None, full, typed) == call_key("f", None, kept, typed)
    with pytest.raises(SerializationError, match="framework object"):
        call_key("f", None, {"x": [v for _, v in args] + [_Frame()]}, typed)


_T = typing.TypeVar("_T")
_LEAVES: list[tuple[Any, bool]] = [
    (int, False),
    (str, False),
    (Any, False),
    (None, False),
    (type(None), False),
    (_T, False),
    ("ForwardRef", False),
    (Mapping, False),
    (Mapping[str, Any], False),
    (_Frame, True),
    (_Session, True),
]


def _wrap(inner: st.SearchStrategy[tuple[Any, bool]]) -> st.SearchStrategy[tuple[Any, bool]]:
    """Annotation constructors: only Optional, a union of unkeyed types and Annotated keep a
    parameter unkeyed; every container, callable or type[...] of one is a keyed value."""
    return st.one_of(
        inner.map(lambda a: (list[a[0]], False)),  # type: ignore[valid-type]
        inner.map(lambda a: (typing.List[a[0]], False)),  # type: ignore[valid-type]  # noqa: UP006
        inner.map(lambda a: (dict[str, a[0]], False)),  # type: ignore[valid-type]
        inner.map(lambda a: (tuple[a[0], ...], False)),  # type: ignore[valid-type]
        inner.map(lambda a: (typing.Callable[[a[0]], int], False)),
        inner.map(lambda a: (typing.Optional[a[0]], a[1])),  # noqa: UP045
        inner.map(lambda a: (Annotated[a[0], "dep"], a[1]) if a[0] is not None else a),
        st.tuples(inner, inner).map(_union),
    )


def _union(ab: tuple[tuple[Any, bool], tuple[Any, bool]]) -> tuple[Any, bool]:
    """A union is unkeyed when every member but None is, and one is."""
    parts = [flag for annotation, flag in ab if annotation not in (None, type(None))]
    return typing.Union[ab[0][0], ab[1][0]], bool(parts) and all(parts)  # noqa: UP007


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.recursive(st.sampled_from(_LEAVES), _wrap, max_leaves=4))
def test_any_annotation_leaves_a_parameter_keyed_unless_it_names_an_unkeyed_type(
    case: tuple[Any, bool],
) -> None:
    """Found on Python 3.10, where ``list[_Frame]`` made the decorator raise TypeError: whatever
    a parameter is annotated with, building the key never raises, and only the registered types
    (alone, optional, in a union of them or Annotated) are left out of it."""
    from distcache._keys import unkeyed_annotation

    annotation, unkeyed = case
    if isinstance(annotation, str):
        annotation = typing.ForwardRef(annotation)
    assert unkeyed_annotation(annotation) is unkeyed, annotation
