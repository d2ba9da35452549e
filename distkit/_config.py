"""Frozen configuration models, and reading them from ``DISTKIT_*`` environment variables."""

from __future__ import annotations

import difflib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, get_origin
from urllib.parse import parse_qs, urlsplit

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from ._errors import ConfigError, redact
from ._units import seconds

__all__ = [
    "Address",
    "RedisConfig",
    "RedlockConfig",
    "RetryConfig",
    "config_error",
    "seconds",
    "validate_config",
]

_SECRET_FIELDS = frozenset({"password", "sentinel_password"})


def config_error(exc: ValidationError, *, source: str) -> ConfigError:
    """Turn a pydantic ``ValidationError`` into a ``ConfigError`` naming fields and bad values.

    Inputs of secret fields are never echoed; URLs have their passwords masked.
    """
    lines = []
    for err in exc.errors(include_url=False):
        loc = ".".join(str(p) for p in err["loc"]) or "(root)"
        # an unknown field may be a misspelt secret ("pasword"): never echo its value
        is_secret = err["type"] == "extra_forbidden" or any(
            str(p) in _SECRET_FIELDS for p in err["loc"]
        )
        shown = "<hidden>" if is_secret else redact(repr(_hide_secrets(err.get("input"))))
        if len(shown) > 200:
            shown = shown[:200] + "..."
        lines.append(f"  {loc}: {redact(err['msg'])} (got {shown})")
    return ConfigError(f"invalid {source}:\n" + "\n".join(lines))


def _hide_secrets(value: Any) -> Any:
    """``value`` with every secret field masked (a model-level error's input is the whole dict)."""
    if isinstance(value, Mapping):
        return {
            k: "<hidden>" if str(k) in _SECRET_FIELDS else _hide_secrets(v)
            for k, v in value.items()
        }
    if type(value) in (list, tuple):
        return type(value)(_hide_secrets(v) for v in value)
    if isinstance(value, str) and any(f in value.lower() for f in _SECRET_FIELDS):
        return "<hidden>"  # e.g. a JSON list of masters read from the environment
    return value


def _parse_address(value: Any) -> Any:
    if isinstance(value, str):
        host, sep, port = value.rpartition(":")
        if not sep or not host:
            raise ValueError(f"address must be 'host:port', got {value!r}")
        return {"host": host.strip("[]"), "port": port}
    if isinstance(value, (tuple, list)) and len(value) == 2:
        return {"host": value[0], "port": value[1]}
    return value


class _Model(BaseModel):
    """Base of the config models: frozen, and invalid input raises ``ConfigError``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise config_error(exc, source=_source_name(type(self))) from None

    # Tell pydantic this __init__ only wraps its own, so nested models are validated directly and
    # their errors reach the outermost model as field errors.
    __init__.__pydantic_base_init__ = True  # type: ignore[attr-defined]

    @classmethod
    def model_validate(cls, obj: Any, **kwargs: Any) -> Any:
        try:
            return super().model_validate(obj, **kwargs)
        except ValidationError as exc:
            raise config_error(exc, source=_source_name(cls)) from None


def _source_name(cls: type) -> str:
    name = cls.__name__.strip("_")
    return name[: -len("Env")] + "Config" if name.endswith("Env") else name


class Address(_Model):
    """A ``host:port`` pair (also accepted as a ``"host:port"`` string or a 2-tuple)."""

    host: str = Field(min_length=1)
    port: int = Field(ge=1, le=65535)

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


AddressLike = Annotated[Address, BeforeValidator(_parse_address)]


class RetryConfig(_Model):
    """How distkit retries an idempotent Redis operation after a transient failure."""

    attempts: int = Field(default=3, ge=1, le=100, description="Total tries, the first included.")
    backoff_initial: float = Field(default=0.02, ge=0, le=60, allow_inf_nan=False)
    backoff_max: float = Field(default=0.5, ge=0, le=600, allow_inf_nan=False)
    jitter: float = Field(default=0.02, ge=0, le=60, allow_inf_nan=False)
    max_delay: float | None = Field(
        default=None, gt=0, allow_inf_nan=False, description="Stop retrying after this long."
    )
    retry_on_timeout: bool = True


class RedisConfig(_Model):
    """How to reach one Redis: a standalone server, a Sentinel-managed master, or a Cluster.

    ``url`` (``redis://``, ``rediss://`` or ``unix://``) is parsed into the other fields, so a
    password never stays in a plain string field.
    """

    mode: Literal["standalone", "sentinel", "cluster"] = "standalone"
    url: str | None = Field(
        default=None, exclude=True, repr=False, description="Parsed into the fields below."
    )
    host: str = Field(default="127.0.0.1", min_length=1)
    port: int = Field(default=6379, ge=1, le=65535)
    db: int = Field(default=0, ge=0, le=10_000)
    unix_socket: Path | None = None
    username: str | None = None
    password: SecretStr | None = None
    tls: bool = False
    tls_ca_file: Path | None = None
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    tls_check_hostname: bool = True
    tls_cert_reqs: Literal["none", "optional", "required"] = "required"
    connect_timeout: float = Field(default=2.0, gt=0, le=3600, allow_inf_nan=False)
    socket_timeout: float = Field(default=5.0, gt=0, le=3600, allow_inf_nan=False)
    socket_keepalive: bool = False
    health_check_interval: float = Field(default=0, ge=0, le=3600, allow_inf_nan=False)
    max_connections: int = Field(default=64, ge=1, le=100_000)
    client_name: str | None = None
    sentinels: tuple[AddressLike, ...] = ()
    sentinel_service: str | None = None
    sentinel_password: SecretStr | None = None
    cluster_nodes: tuple[AddressLike, ...] = ()
    retry: RetryConfig = RetryConfig()

    def __init__(self, url: str | None = None, /, **data: Any) -> None:
        """Validate keyword fields; a URL may come first (``RedisConfig("redis://h:6379/0")``)."""
        if url is not None:
            if "url" in data:
                raise ConfigError("RedisConfig: the URL was given twice (positionally and url=)")
            data["url"] = url
        super().__init__(**data)

    __init__.__pydantic_base_init__ = True  # type: ignore[attr-defined]

    @classmethod
    def from_url(cls, url: str, **overrides: Any) -> RedisConfig:
        """A config from a ``redis://``, ``rediss://`` or ``unix://`` URL; ``overrides`` win.

        Every query option that redis-py's own ``from_url`` understands and that applies to
        distkit is read into a typed field (``socket_timeout``, ``socket_connect_timeout``,
        ``health_check_interval``, ``ssl_cert_reqs``, ...); an unknown one is a ``ConfigError``
        naming it.

        Raises:
            ConfigError: the URL or an override is invalid.
        """
        if not isinstance(url, str):
            raise ConfigError(f"RedisConfig.from_url needs a URL string, got {type(url).__name__}")
        return cls(url=url, **overrides)

    @model_validator(mode="before")
    @classmethod
    def _expand_url(cls, data: Any) -> Any:
        if isinstance(data, str):
            data = {"url": data}
        if not isinstance(data, Mapping) or not data.get("url"):
            return data
        out = dict(data)
        out.update(_parse_url(str(out.pop("url"))))
        for key, value in data.items():  # explicit fields win over the URL's
            if key == "retry" and isinstance(out.get("retry"), dict) and isinstance(value, Mapping):
                out["retry"] = {**out["retry"], **value}
            elif key != "url":
                out[key] = value
        return out

    @field_validator("sentinels", "cluster_nodes", mode="before")
    @classmethod
    def _split_addresses(cls, value: Any) -> Any:
        if isinstance(value, str) and value.lstrip().startswith("["):
            try:
                return json.loads(value)
            except json.JSONDecodeError as exc:
                raise ValueError(f"not a valid JSON list: {exc}") from None
        if isinstance(value, str):
            return tuple(part.strip() for part in value.split(",") if part.strip())
        return value

    @model_validator(mode="after")
    def _check_mode(self) -> RedisConfig:
        if self.mode == "sentinel" and (not self.sentinels or not self.sentinel_service):
            raise ValueError("mode='sentinel' needs sentinels and sentinel_service")
        if self.mode == "cluster" and not self.cluster_nodes:
            object.__setattr__(self, "cluster_nodes", (Address(host=self.host, port=self.port),))
        if self.mode == "cluster" and self.db != 0:
            raise ValueError("Redis Cluster supports only db 0")
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file go together")
        return self

    @classmethod
    def from_env(
        cls, *, prefix: str = "DISTKIT_", env_file: str | Path | None = None
    ) -> RedisConfig:
        """Read ``{prefix}URL``, ``{prefix}HOST``, ``{prefix}RETRY__ATTEMPTS``... into a config.

        Raises:
            ConfigError: a variable holds an invalid value (named, secrets hidden).
        """
        return _from_env(cls, _RedisEnv, prefix, env_file)

    def describe(self) -> str:
        """A one-line, secret-free description of the target, for logs and error messages."""
        if self.mode == "cluster":
            return "cluster " + ",".join(str(a) for a in self.cluster_nodes)
        if self.mode == "sentinel":
            nodes = ",".join(str(a) for a in self.sentinels)
            return f"sentinel {self.sentinel_service}@{nodes}"
        if self.unix_socket:
            return f"unix:{self.unix_socket} db={self.db}"
        return f"{'rediss' if self.tls else 'redis'}://{self.host}:{self.port}/{self.db}"


# URL query options -> (field, parser). The parsers are redis-py's, so a URL means to distkit what
# it means to redis.from_url(); options of redis-py that distkit sets itself or does not support are
# refused by name rather than silently dropped.
_URL_FIELDS: dict[str, str] = {
    "db": "db",
    "socket_timeout": "socket_timeout",
    "socket_connect_timeout": "connect_timeout",
    "socket_keepalive": "socket_keepalive",
    "health_check_interval": "health_check_interval",
    "max_connections": "max_connections",
    "client_name": "client_name",
    "ssl_check_hostname": "tls_check_hostname",
    "ssl_cert_reqs": "tls_cert_reqs",
    "ssl_ca_certs": "tls_ca_file",
    "ssl_certfile": "tls_cert_file",
    "ssl_keyfile": "tls_key_file",
    "retry_on_timeout": "retry.retry_on_timeout",
    "protocol": "",  # checked below: distkit speaks RESP2
}
_URL_REFUSED = {
    "retry_on_error": "distkit retries by RedisConfig.retry, not redis-py's retry",
    "timeout": "a blocking pool is not supported; use max_connections",
}


def _parse_url(url: str) -> dict[str, Any]:
    from redis.connection import parse_url  # redis-py's parser, with its typed query options

    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if scheme not in ("redis", "rediss", "unix"):
        raise ValueError(f"URL scheme must be redis://, rediss:// or unix://, got {redact(url)!r}")
    url = scheme + url[len(scheme) :]  # REDIS:// is valid; redis-py < 8.2 parses lower case only
    parts = urlsplit(url)
    try:
        parts.port  # noqa: B018 - raises for a port out of range
    except ValueError as exc:
        raise ValueError(f"invalid port in URL {redact(url)!r}") from exc
    unknown = sorted(set(parse_qs(parts.query)) - set(_URL_FIELDS))
    for name in unknown:
        why = _URL_REFUSED.get(name, "not an option distkit or redis-py knows")
        raise ValueError(f"URL option {name!r} is not supported ({why})")
    try:
        kw: dict[str, Any] = parse_url(url)  # type: ignore[no-untyped-call,unused-ignore]
    except ValueError as exc:
        raise ValueError(f"{redact(str(exc))} (in {redact(url)!r})") from None
    out: dict[str, Any] = {}
    if "username" in kw:
        out["username"] = kw.pop("username")
    if "password" in kw:
        out["password"] = kw.pop("password")
    kw.pop("connection_class", None)
    if scheme == "unix":
        out["unix_socket"] = kw.pop("path", parts.path)
    else:
        out["tls"] = scheme == "rediss"
        for name in ("host", "port"):
            if name in kw:
                out[name] = kw.pop(name)
        if parts.port is not None:
            out["port"] = parts.port  # redis-py < 8.2 drops a port of 0: the model must refuse it
        path = parts.path.strip("/")
        if path and "db" not in parse_qs(parts.query):
            out["db"] = path  # validated as an int by the model (redis-py drops a bad path)
            kw.pop("db", None)
    protocol = kw.pop("protocol", None)
    if protocol not in (None, 2):
        raise ValueError(f"URL option protocol={protocol!r}: distkit speaks RESP2 (protocol=2)")
    retry: dict[str, Any] = {}
    for name, value in kw.items():
        field = _URL_FIELDS[name]
        if field.startswith("retry."):
            retry[field.split(".", 1)[1]] = value
        else:
            out[field] = value
    if retry:
        out["retry"] = retry
    return out


def _parse_master(value: Any) -> Any:
    return {"url": value} if isinstance(value, str) else value


class RedlockConfig(_Model):
    """The independent Redis masters of a Redlock (each a full ``RedisConfig``; URLs accepted)."""

    masters: tuple[Annotated[RedisConfig, BeforeValidator(_parse_master)], ...] = Field(
        min_length=1
    )

    @field_validator("masters", mode="before")
    @classmethod
    def _split_urls(cls, value: Any) -> Any:
        if isinstance(value, str):
            if value.lstrip().startswith("["):
                try:
                    return json.loads(value)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"masters is not a valid JSON list: {exc}") from None
            return tuple(part.strip() for part in value.split(",") if part.strip())
        return value

    @model_validator(mode="after")
    def _check_masters(self) -> RedlockConfig:
        from ._fanout import server_address

        seen: dict[Any, str] = {}
        for master in self.masters:
            if master.mode == "cluster":
                raise ValueError("a Redlock master must be a standalone or Sentinel-managed server")
            where = master.describe()
            # One server whatever the db and however the loopback address is spelled.
            server: Any = where
            if master.mode != "sentinel":
                server = server_address(master.host, master.port, master.unix_socket)
            if server in seen:
                raise ValueError(
                    f"one server is listed twice, as {seen[server]} and {where} (one failure "
                    "domain, whatever the db); Redlock needs independent masters"
                )
            seen[server] = where
        return self

    @classmethod
    def from_env(
        cls, *, prefix: str = "DISTKIT_REDLOCK_", env_file: str | Path | None = None
    ) -> RedlockConfig:
        """Read ``{prefix}MASTERS`` (comma-separated URLs, or a JSON list of URLs/objects).

        Raises:
            ConfigError: the variable is missing or invalid (named, secrets hidden).
        """
        return _from_env(cls, _RedlockEnv, prefix, env_file)


class _RedisEnv(BaseSettings, RedisConfig):
    model_config = SettingsConfigDict(
        env_nested_delimiter="__", extra="ignore", frozen=True, case_sensitive=False
    )

    # Comma lists ("h1:p1,h2:p2") or JSON lists, both parsed by RedisConfig._split_addresses.
    sentinels: Annotated[tuple[AddressLike, ...], NoDecode] = ()
    cluster_nodes: Annotated[tuple[AddressLike, ...], NoDecode] = ()


class _RedlockEnv(BaseSettings, RedlockConfig):
    model_config = SettingsConfigDict(
        env_nested_delimiter="__", extra="ignore", frozen=True, case_sensitive=False
    )

    masters: Annotated[tuple[Annotated[RedisConfig, BeforeValidator(_parse_master)], ...], NoDecode]


_M = TypeVar("_M", bound=_Model)


# DISTKIT_* variables that are not RedisConfig fields: other readers' (Redlock's masters) and the
# tooling's (tests, benchmarks, chaos soak). Anything else under the prefix is a misspelling.
_NOT_CONFIG = (
    "REDLOCK_",
    "REDIS_SERVER",
    "REQUIRE_REDIS",
    "SKIP_INSTALL",
    "CHAOS_",
    "ADVERSARIAL_",
)


def _known_env_names(model: type[BaseModel], delimiter: str = "__") -> set[str]:
    names = set()
    for name, info in model.model_fields.items():
        if name == "url" or not info.exclude:
            names.add(name.upper())
        kind = info.annotation
        # On Python 3.10 a generic alias (tuple[X, ...]) passes isinstance(kind, type), and
        # issubclass() on it raises TypeError (seen with pydantic 2.7).
        if isinstance(kind, type) and get_origin(kind) is None and issubclass(kind, BaseModel):
            names.update(f"{name.upper()}{delimiter}{sub}" for sub in _known_env_names(kind))
    return names


def _check_env_names(model: type[BaseModel], prefix: str) -> None:
    known = _known_env_names(model)
    upper = prefix.upper()
    for var in os.environ:
        name = var.upper()
        if not name.startswith(upper):
            continue
        rest = name[len(upper) :]
        if rest in known or (upper == "DISTKIT_" and rest.startswith(_NOT_CONFIG)):
            continue
        close = difflib.get_close_matches(rest, sorted(known), n=1)
        hint = f"; did you mean {upper}{close[0]}?" if close else ""
        raise ConfigError(
            f"unknown environment variable {var} (not a field of {model.__name__}{hint})"
        )


def _from_env(
    model: type[_M], settings: type[BaseSettings], prefix: str, env_file: str | Path | None
) -> _M:
    _check_env_names(model, prefix)
    try:
        loaded = settings(_env_prefix=prefix, _env_file=env_file)
    except ConfigError as exc:
        raise ConfigError(f"from environment ({prefix}*): {exc}") from None
    except (ValidationError, ValueError) as exc:  # SettingsError: a variable is not valid JSON
        raise ConfigError(f"invalid environment ({prefix}*): {redact(str(exc))}") from None
    out: _M = model.model_validate(loaded.model_dump())
    return out


def validate_config(model: type[_M], value: Any) -> _M:
    """Validate ``value`` (a model, mapping or URL) as ``model``, raising ``ConfigError``."""
    if isinstance(value, model):
        return value
    out: _M = model.model_validate(value)
    return out
