"""RedisConfig / RetryConfig / RedlockConfig: parsing, validation, secrets, env loading."""

from __future__ import annotations

import math
from datetime import timedelta
from pathlib import Path
from typing import Any

import pydantic
import pytest

from distkit import Address, ConfigError, DistkitError, RedisConfig, RedlockConfig, RetryConfig
from distkit._config import seconds

SECRET = "hunter2-Zq9"  # distinctive: must never show up anywhere but get_secret_value()


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No DISTKIT_* variable of the surrounding shell (or CI) leaks into these tests."""
    import os

    for name in list(os.environ):
        if name.upper().startswith("DISTKIT_"):
            monkeypatch.delenv(name)


def config_error(**fields: Any) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        RedisConfig(**fields)
    return info.value


def assert_no_secret(text: str) -> None:
    assert SECRET not in text
    assert "Zq9" not in text  # not even a fragment


# -- good input -------------------------------------------------------------------------------


def test_defaults() -> None:
    cfg = RedisConfig()
    assert cfg.mode == "standalone"
    assert (cfg.host, cfg.port, cfg.db) == ("127.0.0.1", 6379, 0)
    assert cfg.unix_socket is None
    assert cfg.username is None
    assert cfg.password is None
    assert cfg.tls is False
    assert cfg.connect_timeout > 0
    assert cfg.socket_timeout > 0
    assert cfg.max_connections >= 1
    assert cfg.sentinels == ()
    assert cfg.cluster_nodes == ()
    assert cfg.retry == RetryConfig()
    assert cfg.describe() == "redis://127.0.0.1:6379/0"


def test_redis_url_is_parsed_into_fields() -> None:
    cfg = RedisConfig(url=f"redis://alice:{SECRET}@cache.example:6380/2")
    assert (cfg.host, cfg.port, cfg.db) == ("cache.example", 6380, 2)
    assert cfg.username == "alice"
    assert cfg.password is not None
    assert cfg.password.get_secret_value() == SECRET
    assert cfg.tls is False
    assert cfg.url is None or SECRET not in repr(cfg)


def test_rediss_url_turns_tls_on() -> None:
    cfg = RedisConfig(url="rediss://secure.example:6390/1")
    assert cfg.tls is True
    assert (cfg.host, cfg.port, cfg.db) == ("secure.example", 6390, 1)
    assert cfg.describe() == "rediss://secure.example:6390/1"


def test_unix_url() -> None:
    cfg = RedisConfig(url="unix:///tmp/redis.sock?db=3")
    assert cfg.unix_socket == Path("/tmp/redis.sock")
    assert cfg.db == 3
    assert cfg.describe() == "unix:/tmp/redis.sock db=3"


@pytest.mark.parametrize(
    ("url", "host", "port", "db"),
    [
        ("redis://h", "h", 6379, 0),
        ("redis://h:1234", "h", 1234, 0),
        ("redis://h/?db=4", "h", 6379, 4),
        ("REDIS://h:1/5", "h", 1, 5),
        ("redis://[::1]:7000/0", "::1", 7000, 0),
    ],
)
def test_url_variants(url: str, host: str, port: int, db: int) -> None:
    cfg = RedisConfig(url=url)
    assert (cfg.host, cfg.port, cfg.db) == (host, port, db)


def test_url_credentials_are_percent_decoded() -> None:
    cfg = RedisConfig(url="redis://u%40corp:p%3Ass%40w@h/0")
    assert cfg.username == "u@corp"
    assert cfg.password is not None
    assert cfg.password.get_secret_value() == "p:ss@w"


def test_url_without_user_still_carries_password() -> None:
    cfg = RedisConfig(url=f"redis://:{SECRET}@h/0")
    assert cfg.username is None
    assert cfg.password is not None
    assert cfg.password.get_secret_value() == SECRET


def test_explicit_fields_beat_the_url() -> None:
    cfg = RedisConfig(
        url=f"rediss://alice:{SECRET}@h:1/5", port=7, db=1, password="explicit", username="bob"
    )
    assert (cfg.host, cfg.port, cfg.db) == ("h", 7, 1)
    assert cfg.tls is True  # from the URL, not overridden
    assert cfg.username == "bob"
    assert cfg.password is not None
    assert cfg.password.get_secret_value() == "explicit"


def test_model_validate_accepts_a_bare_url_string() -> None:
    cfg = RedisConfig.model_validate("redis://h:1/2")
    assert (cfg.host, cfg.port, cfg.db) == ("h", 1, 2)


def test_sentinel_addresses_from_a_comma_list() -> None:
    cfg = RedisConfig(
        mode="sentinel", sentinels=" s1:26379, s2:26380 ,[::1]:3", sentinel_service="mymaster"
    )
    assert cfg.sentinels == (
        Address(host="s1", port=26379),
        Address(host="s2", port=26380),
        Address(host="::1", port=3),
    )
    assert cfg.describe() == "sentinel mymaster@s1:26379,s2:26380,::1:3"


def test_cluster_nodes_accept_strings_tuples_and_mappings() -> None:
    cfg = RedisConfig(mode="cluster", cluster_nodes=[("a", 1), "b:2", {"host": "c", "port": 3}])
    assert [str(a) for a in cfg.cluster_nodes] == ["a:1", "b:2", "c:3"]
    assert cfg.describe() == "cluster a:1,b:2,c:3"


def test_cluster_mode_defaults_to_host_and_port_as_the_startup_node() -> None:
    cfg = RedisConfig(mode="cluster", host="node.example", port=7000)
    assert cfg.cluster_nodes == (Address(host="node.example", port=7000),)
    assert RedisConfig(mode="cluster").cluster_nodes == (Address(host="127.0.0.1", port=6379),)


def test_tls_cert_and_key_together() -> None:
    cfg = RedisConfig(tls=True, tls_cert_file="/c.pem", tls_key_file="/k.pem", tls_ca_file="/ca")
    assert cfg.tls_cert_file == Path("/c.pem")
    assert cfg.tls_key_file == Path("/k.pem")


def test_nested_retry_from_a_mapping() -> None:
    cfg = RedisConfig(retry={"attempts": 5, "backoff_initial": 0.001, "max_delay": 2})
    assert cfg.retry.attempts == 5
    assert cfg.retry.backoff_initial == 0.001
    assert cfg.retry.max_delay == 2.0


def test_models_are_frozen() -> None:
    cfg = RedisConfig(host="x")
    with pytest.raises(pydantic.ValidationError):
        cfg.host = "y"
    with pytest.raises(pydantic.ValidationError):
        cfg.retry.attempts = 9
    assert cfg.host == "x"
    assert cfg.retry.attempts == RetryConfig().attempts
    with pytest.raises(pydantic.ValidationError):
        Address(host="h", port=1).port = 2


def test_equal_configs_are_equal_and_hashable() -> None:
    a = RedisConfig(url="redis://h:1/2")
    b = RedisConfig(host="h", port=1, db=2)
    assert a == b
    assert hash(a.retry) == hash(b.retry)


# -- bad input --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "field", "shown"),
    [
        ({"port": 70000}, "port", "70000"),
        ({"port": 0}, "port", "0"),
        ({"port": "abc"}, "port", "'abc'"),
        ({"host": 123}, "host", "123"),
        ({"host": ""}, "host", "''"),
        ({"db": -1}, "db", "-1"),
        ({"tls": "maybe"}, "tls", "'maybe'"),
        ({"max_connections": 0}, "max_connections", "0"),
        ({"mode": "weird"}, "mode", "'weird'"),
        ({"socket_timeout": -1}, "socket_timeout", "-1"),
        ({"connect_timeout": 0}, "connect_timeout", "0"),
        ({"socket_timeout": math.nan}, "socket_timeout", "nan"),
        ({"connect_timeout": math.inf}, "connect_timeout", "inf"),
        ({"bogus": 1}, "bogus", "<hidden>"),  # unknown fields may be misspelt secrets
        ({"retry": {"attempts": 0}}, "retry.attempts", "0"),
        ({"retry": {"attempts": "many"}}, "retry.attempts", "'many'"),
        ({"retry": {"backoff_initial": -0.1}}, "retry.backoff_initial", "-0.1"),
        ({"retry": {"max_delay": math.inf}}, "retry.max_delay", "inf"),
        ({"retry": {"unknown": 1}}, "retry.unknown", "<hidden>"),
        ({"url": "redis://h/abc"}, "db", "'abc'"),
        (
            {"mode": "cluster", "cluster_nodes": "a:1,b:x"},
            "cluster_nodes.1.port",
            "'x'",
        ),
        (
            {"mode": "sentinel", "sentinels": "nohostport", "sentinel_service": "m"},
            "sentinels.0",
            "'nohostport'",
        ),
    ],
)
def test_bad_field_raises_config_error_naming_field_and_value(
    fields: dict[str, Any], field: str, shown: str
) -> None:
    err = config_error(**fields)
    assert isinstance(err, ValueError)
    assert isinstance(err, DistkitError)
    assert not isinstance(err, pydantic.ValidationError)
    message = str(err)
    assert f"{field}:" in message
    assert f"(got {shown}" in message


@pytest.mark.parametrize(
    ("fields", "needle"),
    [
        ({"url": "http://h:1/0"}, "scheme"),
        ({"url": "redis://h:99999/0"}, "port"),
        ({"url": "redis://h:0/0"}, "port"),  # redis-py < 8.2 drops a 0 port: not the default
        ({"url": "REDIS://h:0/0"}, "port"),
        ({"mode": "sentinel"}, "sentinels"),
        ({"mode": "sentinel", "sentinels": "a:1"}, "sentinel_service"),
        ({"mode": "cluster", "db": 3}, "db 0"),
        ({"tls_cert_file": "/c.pem"}, "tls_key_file"),
        ({"tls_key_file": "/k.pem"}, "tls_cert_file"),
    ],
)
def test_inconsistent_config_raises_config_error(fields: dict[str, Any], needle: str) -> None:
    message = str(config_error(**fields))
    assert needle in message


def test_config_error_is_raised_instead_of_a_pydantic_error_by_model_validate() -> None:
    with pytest.raises(ConfigError, match="port"):
        RedisConfig.model_validate({"port": -5})
    with pytest.raises(ConfigError, match=r"attempts.*got 101"):
        RetryConfig.model_validate({"attempts": 101})


def test_retry_config_errors_on_its_own() -> None:
    with pytest.raises(ConfigError, match=r"attempts.*got 0"):
        RetryConfig(attempts=0)
    with pytest.raises(ConfigError, match="jitter"):
        RetryConfig(jitter=math.nan)


# -- secrets ----------------------------------------------------------------------------------


def _secret_bearing_configs() -> list[RedisConfig]:
    return [
        RedisConfig(password=SECRET),
        RedisConfig(url=f"redis://alice:{SECRET}@h:1/0"),
        RedisConfig(url=f"rediss://:{SECRET}@h:1/0"),
        RedisConfig(
            mode="sentinel",
            sentinels="a:1",
            sentinel_service="m",
            sentinel_password=SECRET,
            password=SECRET,
        ),
    ]


@pytest.mark.parametrize("cfg", _secret_bearing_configs(), ids=["field", "url", "tls", "sentinel"])
def test_password_never_in_repr_str_or_json(cfg: RedisConfig) -> None:
    for text in (
        repr(cfg),
        str(cfg),
        cfg.model_dump_json(),
        cfg.describe(),
        repr(cfg.model_dump()),
    ):
        assert_no_secret(text)
    assert cfg.password is not None
    assert cfg.password.get_secret_value() == SECRET


def test_password_never_in_redlock_config_repr() -> None:
    cfg = RedlockConfig(masters=[f"redis://:{SECRET}@a:1/0", f"redis://:{SECRET}@b:1/0"])
    assert_no_secret(repr(cfg))
    assert_no_secret(str(cfg))
    assert_no_secret(cfg.model_dump_json())


@pytest.mark.parametrize(
    "fields",
    [
        {"password": SECRET, "port": 0},
        {"password": SECRET, "bogus": 1},
        {"password": SECRET, "mode": "sentinel"},  # a model-level (root) error
        {"sentinel_password": SECRET, "mode": "sentinel"},
        {"password": SECRET, "mode": "cluster", "db": 2},
        {"password": 12345},  # wrong type for the secret itself
        {"url": f"redis://u:{SECRET}@h/abc"},
        {"url": f"redis://u:{SECRET}@h:99999/0"},
        {"url": f"http://u:{SECRET}@h/0"},
        {"url": f"redis://u:{SECRET}@h/0", "mode": "sentinel"},
        {"url": f"redis://:{SECRET}@h/0", "mode": "cluster", "db": 1},
        {"url": f"redis://u:{SECRET}@h/0", "retry": {"attempts": 0}},
    ],
)
def test_password_never_in_config_error(fields: dict[str, Any]) -> None:
    err = config_error(**fields)
    assert_no_secret(str(err))
    assert_no_secret(repr(err))
    assert err.__cause__ is None or SECRET not in str(err.__cause__)


def test_password_of_a_wrong_type_is_hidden() -> None:
    err = config_error(password=["not", "a", "string", SECRET])
    assert "password" in str(err)
    assert "<hidden>" in str(err)
    assert_no_secret(str(err))


def test_password_never_in_redlock_config_error() -> None:
    dup = f"redis://:{SECRET}@a:1/0"
    with pytest.raises(ConfigError) as dup_info:
        RedlockConfig(masters=[dup, dup])
    assert "twice" in str(dup_info.value)
    assert_no_secret(str(dup_info.value))
    with pytest.raises(ConfigError) as clu_info:
        RedlockConfig(masters=[{"mode": "cluster", "password": SECRET}])
    assert "standalone or Sentinel" in str(clu_info.value)
    assert_no_secret(str(clu_info.value))


# -- RedlockConfig ----------------------------------------------------------------------------


def test_redlock_config_from_urls_and_configs() -> None:
    cfg = RedlockConfig(masters=["redis://a:1/0", RedisConfig(host="b", port=2), {"port": 3}])
    assert [m.describe() for m in cfg.masters] == [
        "redis://a:1/0",
        "redis://b:2/0",
        "redis://127.0.0.1:3/0",
    ]


def test_redlock_config_needs_a_master() -> None:
    with pytest.raises(ConfigError, match="masters"):
        RedlockConfig(masters=[])


def test_redlock_config_rejects_duplicates_even_with_different_spelling() -> None:
    with pytest.raises(ConfigError, match="twice"):
        RedlockConfig(masters=["redis://a:1/0", RedisConfig(host="a", port=1)])


def test_redlock_config_rejects_one_server_under_two_loopback_names_or_dbs() -> None:
    """localhost, 127.0.0.1 and ::1 are one server; so are two dbs of it (one failure domain)."""
    for a, b in [
        ("redis://127.0.0.1:7001/0", "redis://localhost:7001/0"),
        ("redis://localhost:7001/0", "redis://[::1]:7001/0"),
        ("redis://127.0.0.1:7001/0", "redis://127.0.0.1:7001/1"),
        ("unix:///tmp/r.sock?db=0", "unix:///tmp/r.sock?db=2"),
    ]:
        with pytest.raises(
            ConfigError, match=r"listed twice, as \S*(7001|sock)\S* .*and \S*(7001|sock)"
        ):
            RedlockConfig(masters=[a, "redis://127.0.0.1:7002/0", b])
    RedlockConfig(masters=["redis://127.0.0.1:7001/0", "redis://127.0.0.1:7002/0"])


def test_redlock_config_names_the_bad_master() -> None:
    with pytest.raises(ConfigError, match=r"masters\.1\.port"):
        RedlockConfig(masters=["redis://a:1/0", {"port": 0}])


# -- from_env ---------------------------------------------------------------------------------


def test_from_env_defaults_when_nothing_is_set() -> None:
    assert RedisConfig.from_env() == RedisConfig()


def test_from_env_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DISTKIT_URL", f"redis://alice:{SECRET}@env.example:6400/3")
    cfg = RedisConfig.from_env()
    assert type(cfg) is RedisConfig
    assert (cfg.host, cfg.port, cfg.db, cfg.username) == ("env.example", 6400, 3, "alice")
    assert cfg.password is not None
    assert cfg.password.get_secret_value() == SECRET
    assert_no_secret(repr(cfg))


def test_from_env_fields_and_nested_retry(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DISTKIT_HOST", "envhost")
    monkeypatch.setenv("DISTKIT_PORT", "6500")
    monkeypatch.setenv("DISTKIT_SOCKET_TIMEOUT", "0.25")
    monkeypatch.setenv("DISTKIT_RETRY__ATTEMPTS", "7")
    monkeypatch.setenv("DISTKIT_PASSWORD", SECRET)
    cfg = RedisConfig.from_env()
    assert (cfg.host, cfg.port, cfg.socket_timeout) == ("envhost", 6500, 0.25)
    assert cfg.retry.attempts == 7
    assert cfg.retry.backoff_initial == RetryConfig().backoff_initial
    assert cfg.password is not None
    assert cfg.password.get_secret_value() == SECRET


def test_from_env_explicit_field_beats_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DISTKIT_URL", "redis://urlhost:1/1")
    monkeypatch.setenv("DISTKIT_DB", "4")
    cfg = RedisConfig.from_env()
    assert (cfg.host, cfg.port, cfg.db) == ("urlhost", 1, 4)


def test_from_env_cluster_nodes_comma_list(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DISTKIT_MODE", "cluster")
    monkeypatch.setenv("DISTKIT_CLUSTER_NODES", "a:1,b:2")
    assert [str(a) for a in RedisConfig.from_env().cluster_nodes] == ["a:1", "b:2"]


def test_from_env_sentinels_comma_list_and_json(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DISTKIT_MODE", "sentinel")
    monkeypatch.setenv("DISTKIT_SENTINEL_SERVICE", "mymaster")
    monkeypatch.setenv("DISTKIT_SENTINELS", "s1:26379,s2:26380")
    assert [str(a) for a in RedisConfig.from_env().sentinels] == ["s1:26379", "s2:26380"]
    monkeypatch.setenv("DISTKIT_SENTINELS", '["s3:1", "s4:2"]')
    assert [str(a) for a in RedisConfig.from_env().sentinels] == ["s3:1", "s4:2"]


def test_from_env_custom_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MYAPP_REDIS_HOST", "custom")
    monkeypatch.setenv("MYAPP_REDIS_RETRY__ATTEMPTS", "2")
    monkeypatch.setenv("DISTKIT_HOST", "ignored")
    cfg = RedisConfig.from_env(prefix="MYAPP_REDIS_")
    assert cfg.host == "custom"
    assert cfg.retry.attempts == 2


def test_from_env_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    env_file = tmp_path / "distkit.env"
    env_file.write_text(f"DISTKIT_HOST=fromfile\nDISTKIT_PASSWORD={SECRET}\nDISTKIT_PORT=6601\n")
    cfg = RedisConfig.from_env(env_file=env_file)
    assert (cfg.host, cfg.port) == ("fromfile", 6601)
    assert cfg.password is not None
    assert cfg.password.get_secret_value() == SECRET
    # A real environment variable wins over the file.
    monkeypatch.setenv("DISTKIT_HOST", "fromenv")
    assert RedisConfig.from_env(env_file=str(env_file)).host == "fromenv"


@pytest.mark.parametrize(
    ("variables", "field"),
    [
        ({"DISTKIT_PORT": "not-a-port"}, "port"),
        ({"DISTKIT_PORT": "70000"}, "port"),
        ({"DISTKIT_SOCKET_TIMEOUT": "nan"}, "socket_timeout"),
        ({"DISTKIT_CONNECT_TIMEOUT": "-1"}, "connect_timeout"),
        ({"DISTKIT_RETRY__ATTEMPTS": "0"}, "retry.attempts"),
        ({"DISTKIT_URL": "ftp://h/0"}, "scheme"),
        ({"DISTKIT_RETRY": "{not json"}, "retry"),
        ({"DISTKIT_MODE": "sentinel"}, "sentinels"),
    ],
)
def test_from_env_bad_values(
    monkeypatch: pytest.MonkeyPatch, variables: dict[str, str], field: str
) -> None:
    monkeypatch.setenv("DISTKIT_PASSWORD", SECRET)
    monkeypatch.setenv("DISTKIT_SENTINEL_PASSWORD", SECRET)
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as info:
        RedisConfig.from_env()
    message = str(info.value)
    assert field in message
    assert_no_secret(message)
    assert info.value.__cause__ is None or SECRET not in str(info.value.__cause__)


def test_from_env_url_password_not_in_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DISTKIT_URL", f"redis://u:{SECRET}@h:99999/0")
    with pytest.raises(ConfigError) as info:
        RedisConfig.from_env()
    assert "port" in str(info.value)
    assert_no_secret(str(info.value))


def test_redlock_from_env_comma_list(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(
        "DISTKIT_REDLOCK_MASTERS", f"redis://:{SECRET}@a:1/0, redis://b:2/0 ,redis://c:3/0"
    )
    cfg = RedlockConfig.from_env()
    assert type(cfg) is RedlockConfig
    assert [m.describe() for m in cfg.masters] == [
        "redis://a:1/0",
        "redis://b:2/0",
        "redis://c:3/0",
    ]
    assert cfg.masters[0].password is not None
    assert cfg.masters[0].password.get_secret_value() == SECRET
    assert_no_secret(repr(cfg))


def test_redlock_from_env_json_list(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(
        "DISTKIT_REDLOCK_MASTERS",
        '["redis://a:1/0", {"host": "b", "port": 2, "socket_timeout": 0.5}]',
    )
    cfg = RedlockConfig.from_env()
    assert [m.describe() for m in cfg.masters] == ["redis://a:1/0", "redis://b:2/0"]
    assert cfg.masters[1].socket_timeout == 0.5


def test_redlock_from_env_custom_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOCKS_MASTERS", "redis://x:1/0")
    assert [m.describe() for m in RedlockConfig.from_env(prefix="LOCKS_").masters] == [
        "redis://x:1/0"
    ]


@pytest.mark.parametrize(
    ("value", "needle"),
    [
        (f"redis://:{SECRET}@a:1/0,redis://:{SECRET}@a:1/0", "twice"),
        ("redis://a:1/0,redis://a:1", "twice"),
        (f'[{{"mode": "cluster", "host": "a", "port": 1, "password": "{SECRET}"}}]', "standalone"),
        ('["redis://a:1/0", ', "JSON"),
        (f"redis://:{SECRET}@a:0/0", "masters"),
        ("", "masters"),
    ],
)
def test_redlock_from_env_rejects(monkeypatch: pytest.MonkeyPatch, value: str, needle: str) -> None:
    monkeypatch.setenv("DISTKIT_REDLOCK_MASTERS", value)
    with pytest.raises(ConfigError) as info:
        RedlockConfig.from_env()
    assert needle in str(info.value)
    assert_no_secret(str(info.value))


def test_redlock_from_env_missing_variable() -> None:
    with pytest.raises(ConfigError, match="masters"):
        RedlockConfig.from_env()


# -- seconds() --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [(1.5, 1.5), (2, 2.0), (timedelta(milliseconds=250), 0.25), (timedelta(minutes=1), 60.0)],
)
def test_seconds_accepts_numbers_and_timedeltas(value: float | timedelta, expected: float) -> None:
    out = seconds(value, field="ttl")
    assert type(out) is float
    assert out == expected


def test_seconds_zero_only_with_allow_zero() -> None:
    assert seconds(0, field="wait", allow_zero=True) == 0.0
    assert seconds(timedelta(0), field="wait", allow_zero=True) == 0.0
    with pytest.raises(ConfigError, match="ttl"):
        seconds(0, field="ttl")
    with pytest.raises(ConfigError, match="ttl"):
        seconds(timedelta(0), field="ttl")


@pytest.mark.parametrize(
    "value",
    [-1, -0.001, timedelta(seconds=-1), math.nan, math.inf, -math.inf, True, False, "1", None],
)
def test_seconds_rejects(value: Any) -> None:
    with pytest.raises(ConfigError) as info:
        seconds(value, field="my_ttl", allow_zero=True)
    assert "my_ttl" in str(info.value)
    assert isinstance(info.value, ValueError)


def test_a_misspelt_secret_field_is_not_echoed() -> None:
    with pytest.raises(ConfigError) as info:
        RedisConfig(pasword="hunter2")  # type: ignore[call-arg]
    assert "pasword" in str(info.value)
    assert "hunter2" not in str(info.value)
