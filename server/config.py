"""Configuration from the environment (and `.env`), validated at start.

Every field is an environment variable of the same name in upper case; the
README's configuration table lists them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal
from urllib.parse import parse_qs, unquote, urlsplit

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

ROOT = Path(__file__).resolve().parent.parent

DEFAULT_JWT_SECRET = "dev-insecure-jwt-secret-change-me-please-0000"


class ConfigError(RuntimeError):
    """The configuration cannot be used; the message says what to change."""


class DatabaseURL:
    """A parsed `mysql://user:pass@host:port/db[?unix_socket=/path]`."""

    def __init__(
        self,
        *,
        user: str,
        password: str,
        database: str,
        host: str = "127.0.0.1",
        port: int = 3306,
        unix_socket: str | None = None,
    ) -> None:
        self.user = user
        self.password = password
        self.database = database
        self.host = host
        self.port = port
        self.unix_socket = unix_socket

    @classmethod
    def parse(cls, url: str) -> DatabaseURL:
        parts = urlsplit(url)
        if parts.scheme not in {"mysql", "mysql+aiomysql", "mariadb"}:
            raise ConfigError(f"DATABASE_URL must start with mysql://, got {parts.scheme!r}")
        database = parts.path.lstrip("/")
        if not database:
            raise ConfigError("DATABASE_URL must name a database: mysql://user:pass@host:3306/DB")
        query = parse_qs(parts.query)
        sock = query.get("unix_socket", [None])[0]
        return cls(
            user=unquote(parts.username or "root"),
            password=unquote(parts.password or ""),
            database=database,
            host=parts.hostname or "127.0.0.1",
            port=parts.port or 3306,
            unix_socket=sock,
        )

    def with_database(self, database: str) -> DatabaseURL:
        return DatabaseURL(
            user=self.user,
            password=self.password,
            database=database,
            host=self.host,
            port=self.port,
            unix_socket=self.unix_socket,
        )

    def __repr__(self) -> str:
        where = self.unix_socket or f"{self.host}:{self.port}"
        return f"DatabaseURL({self.user}@{where}/{self.database})"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", env_file_encoding="utf-8", extra="ignore")

    app_env: Literal["dev", "test", "prod"] = "dev"
    host: str = "0.0.0.0"
    port: int = Field(8080, ge=0, le=65535)
    public_base_url: str | None = None
    log_level: str = "INFO"
    var_dir: Path = ROOT / "var"

    database_url: str | None = None
    redis_url: str | None = None

    # MySQL pool. Sizing rule: instances × db_pool_max ≤ 80 % of max_connections.
    db_pool_min: int = Field(1, ge=0)
    db_pool_max: int = Field(20, ge=1)
    db_pool_recycle: int = Field(3600, ge=-1)
    db_connect_timeout: float = Field(5.0, gt=0)
    db_acquire_timeout: float = Field(3.0, gt=0)

    redis_timeout: float = Field(3.0, gt=0)
    redis_max_connections: int = Field(100, ge=1)

    migrate_on_start: bool = True
    shutdown_timeout: float = Field(5.0, ge=0)
    client_max_size: int = 12 * 1024 * 1024
    json_body_max: int = 256 * 1024

    jwt_secret: SecretStr = SecretStr(DEFAULT_JWT_SECRET)
    admin_phone: str | None = None
    admin_password: SecretStr | None = None

    # Actors (issue 3): mailbox sizes per kind and idle time before passivation.
    actor_ask_timeout: float = Field(10.0, gt=0)
    actor_idle_seconds: float = Field(300.0, gt=0)
    actor_mailbox_default: int = Field(1000, ge=1)

    @field_validator("log_level")
    @classmethod
    def _upper(cls, v: str) -> str:
        return v.upper()

    @model_validator(mode="after")
    def _pool_bounds(self) -> Settings:
        if self.db_pool_min > self.db_pool_max:
            raise ValueError("DB_POOL_MIN must not exceed DB_POOL_MAX")
        return self

    @property
    def is_prod(self) -> bool:
        return self.app_env == "prod"

    @property
    def embedded_db(self) -> bool:
        return not self.database_url

    @property
    def embedded_redis(self) -> bool:
        return not self.redis_url

    def db(self) -> DatabaseURL:
        if not self.database_url:
            raise ConfigError("DATABASE_URL is not set and no embedded MariaDB was started")
        return DatabaseURL.parse(self.database_url)

    def check_for_start(self) -> None:
        """Refuse configurations that must never serve production traffic."""
        if not self.is_prod:
            return
        problems = []
        secret = self.jwt_secret.get_secret_value()
        if secret == DEFAULT_JWT_SECRET or len(secret) < 32:
            problems.append("JWT_SECRET must be set to a random value of at least 32 characters")
        if self.embedded_db:
            problems.append("DATABASE_URL must point at a real MySQL/MariaDB server")
        if self.embedded_redis:
            problems.append("REDIS_URL must point at a real Redis server")
        if problems:
            raise ConfigError("APP_ENV=prod refuses to start: " + "; ".join(problems))


def load_settings(**overrides: object) -> Settings:
    return Settings(**overrides)  # type: ignore[arg-type]
