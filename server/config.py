"""Configuration from the environment (and `.env`), validated at start.

Every field is an environment variable of the same name in upper case; the
README's configuration table lists them.
"""

from __future__ import annotations

import json
import types
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin
from urllib.parse import parse_qs, unquote, urlsplit

from annotated_types import Ge, Gt, Le, Lt
from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict, SettingsError

from server.vendors.config import VendorsSetting  # vendors (issue 6)

ROOT = Path(__file__).resolve().parent.parent

DEFAULT_JWT_SECRET = "dev-insecure-jwt-secret-change-me-please-0000"

# SIGNUP_CREDITS when unset in dev and test: the seeded features (sql/0004) cost 10 + 2 + 8
# = 20 credits for one run of each, so a new account can run every one of them five times.
DEV_SIGNUP_CREDITS = 100


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
        shape = "mysql://user:pass@host:3306/db or mysql://user@localhost/db?unix_socket=/path"
        parts = urlsplit(url)
        if parts.scheme not in {"mysql", "mysql+aiomysql", "mariadb"}:
            raise ConfigError(
                f"DATABASE_URL must start with mysql:// ({shape}), got {parts.scheme or 'no scheme'!r}"
            )
        database = parts.path.lstrip("/")
        if not database or "/" in database:
            raise ConfigError(f"DATABASE_URL must name one database after the host ({shape})")
        try:
            port = parts.port
        except ValueError:
            raise ConfigError(
                f"DATABASE_URL has a bad port: expected an integer from 1 to 65535 ({shape})"
            ) from None
        query = parse_qs(parts.query)
        sock = query.get("unix_socket", [None])[0]
        if not parts.hostname and not sock:
            raise ConfigError(f"DATABASE_URL must name a host or a unix_socket ({shape})")
        return cls(
            user=unquote(parts.username or "root"),
            password=unquote(parts.password or ""),
            database=database,
            host=parts.hostname or "127.0.0.1",
            port=port or 3306,
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
    # --- HTTP edge (issue 10) ---  docs/architecture.md
    request_body_timeout: float = Field(30.0, gt=0)  # a body not fully received by then: 408
    http_max_field_size: int = Field(16 * 1024, ge=8190)  # longest header value aiohttp parses
    # Browser Origins that may call /api/ from their pages (CORS), comma separated ("*": any).
    cors_allowed_origins: str = ""

    jwt_secret: SecretStr = SecretStr(DEFAULT_JWT_SECRET)
    admin_phone: str | None = None
    admin_password: SecretStr | None = None

    # --- auth (issue 4) ---
    # JWT signing keys as "kid:secret,kid:secret", newest first: the first signs, all verify.
    # Unset: JWT_SECRET alone, under a kid derived from it.
    jwt_keys: SecretStr = SecretStr("")
    access_token_ttl: int = Field(900, ge=60)
    refresh_token_ttl: int = Field(604800, ge=300)
    # argon2id cost (defaults: RFC 9106 low-memory profile, see server/auth/passwords.py).
    argon2_time_cost: int = Field(3, ge=1)
    argon2_memory_kib: int = Field(64 * 1024, ge=8)
    argon2_parallelism: int = Field(1, ge=1)
    auth_hash_threads: int = Field(2, ge=1)
    # SMS codes: life, wrong tries, and the send limits.
    sms_provider: Literal["console", "tencent", "disabled"] = "console"
    sms_code_ttl: int = Field(300, ge=30)
    sms_code_max_tries: int = Field(5, ge=1)
    sms_resend_interval: int = Field(60, ge=0)
    sms_daily_cap: int = Field(10, ge=1)
    sms_ip_limit: int = Field(30, ge=1)
    sms_ip_window: int = Field(3600, ge=1)
    # Failed logins: per phone (locks the account) and per IP (rate limit), in one window.
    login_max_failures: int = Field(5, ge=1)
    login_ip_max_failures: int = Field(50, ge=1)
    login_failure_window: int = Field(900, ge=1)
    # Hops of trusted reverse proxies in front of us: the client IP is read from
    # X-Forwarded-For that many entries from the right (0: the socket peer).
    trusted_proxy_hops: int = Field(0, ge=0)
    profile_cache_ttl: int = Field(3600, ge=1)
    # Hot profiles also kept in each process, exact across processes (server/auth/nearcache.py).
    profile_local_cache_size: int = Field(10_000, ge=0)
    profile_local_cache_ttl: float = Field(30.0, gt=0)
    wechat_appid: str | None = None
    wechat_secret: SecretStr | None = None
    wechat_api_base: str = "https://api.weixin.qq.com"
    wechat_timeout: float = Field(5.0, gt=0)
    tencent_secret_id: str | None = None
    tencent_secret_key: SecretStr | None = None
    tencent_sms_app_id: str | None = None
    tencent_sms_sign_name: str | None = None
    tencent_sms_template_id: str | None = None
    tencent_sms_region: str = "ap-guangzhou"
    tencent_sms_endpoint: str = "https://sms.tencentcloudapi.com"
    tencent_sms_timeout: int = Field(10, ge=1)

    # Actors (issue 3): mailbox sizes per kind and idle time before passivation.
    actor_ask_timeout: float = Field(10.0, gt=0)
    actor_idle_seconds: float = Field(300.0, gt=0)
    actor_mailbox_default: int = Field(1000, ge=1)
    actor_stop_timeout: float = Field(5.0, gt=0)

    # Cron jobs (reservation sweeper, …); off in tests that drive jobs by hand.
    cron_enabled: bool = True

    # Credits every new account starts with. Unset: 0 in prod, DEV_SIGNUP_CREDITS in dev and
    # test, so a new user can try every seeded feature (see _signup_default).
    signup_credits: int = Field(0, ge=0, le=100_000)

    # --- tasks (issue 6) ---
    task_concurrency: int = Field(16, ge=1)  # task runs in flight per process
    task_pending: int = Field(256, ge=1)  # waiting beyond that; more answers BUSY
    task_timeout: float = Field(600.0, gt=0)  # a run taking longer fails, credits returned
    task_lease_ttl: float = Field(15.0, gt=0)  # renewed every third of it while running
    task_max_attempts: int = Field(2, ge=1)  # runs of one task, recovery included

    # --- storage (issue 6) ---
    # local: files under VAR_DIR/storage served by GET /files/{key}; cos: Tencent Cloud COS.
    storage_backend: Literal["local", "cos"] = "local"
    # Signs /files URLs (HMAC-SHA256). Empty: derived from JWT_SECRET with HKDF.
    storage_url_secret: SecretStr | None = None
    storage_url_ttl: int = Field(3600, ge=60)
    cos_region: str | None = None
    cos_bucket: str | None = None
    cos_secret_id: str | None = None
    cos_secret_key: SecretStr | None = None
    cos_scheme: Literal["http", "https"] = "https"
    cos_domain: str | None = None  # custom/CDN domain (or 127.0.0.1:PORT for a fake)
    cos_timeout: float = Field(10.0, gt=0)  # per HTTP attempt; the whole call gets (retries+1)×
    cos_retries: int = Field(1, ge=0)
    cos_threads: int = Field(8, ge=1)
    cos_max_pending: int = Field(64, ge=1)  # running + queued COS calls before BUSY

    # --- websocket (issue 7) ---  docs/websocket.md
    # Browser Origins allowed to open /api/v1/ws, comma separated ("*": any). A request
    # without Origin (mini-program, native app) and a page of this same host always pass.
    ws_allowed_origins: str = ""
    ws_auth_timeout: float = Field(10.0, gt=0)  # seconds to send the auth frame, else 4408
    ws_heartbeat: float = Field(25.0, gt=0)  # ping interval; no pong within half of it closes
    ws_queue_size: int = Field(256, ge=1)  # frames waiting for one socket before 4429 (too slow)
    ws_send_timeout: float = Field(10.0, gt=0)  # one frame may take this long to write, else 4429
    ws_close_timeout: float = Field(5.0, gt=0)  # closing handshake; then the socket is dropped
    ws_max_per_user: int = Field(10, ge=1)  # sockets of one user on one process, else 4429
    ws_max_connections: int = Field(10_000, ge=1)  # sockets on one process, else 4429
    ws_max_frame: int = Field(16 * 1024, ge=1024)  # largest client frame (bytes)
    ws_expiry_warning: float = Field(60.0, ge=0)  # auth.expiring this long before the token's exp
    # Event retention per user: every event of the last EVENTS_RETENTION_HOURS and at
    # least the last EVENTS_KEEP_MIN, whichever is more, up to EVENTS_MAX_PER_USER.
    events_retention_hours: float = Field(24.0, gt=0)
    events_keep_min: int = Field(1000, ge=1)
    events_max_per_user: int = Field(100_000, ge=1)

    # --- vendors (issue 6) ---  docs/vendors.md
    # VENDORS: JSON {name: {kind, base_url, api_key, concurrency, qps, timeout, retries,
    # mailbox, breaker_threshold, …}}; limits left out take their kind's default. The
    # built-in `local` vendor is always there (an entry only tunes its limits).
    vendors: VendorsSetting = Field(default_factory=dict, validate_default=True)
    vendor_input_url_ttl: int = Field(3600, ge=60)  # life of the signed URLs DashScope fetches inputs from
    # The nightly orphan-file cleanup (server/orphans.py) never deletes an asset file younger than this.
    orphan_file_min_age: int = Field(86_400, ge=3600)
    # Sentry (optional, issue 14; docs/ops.md): off unless SENTRY_DSN is set.
    sentry_dsn: str | None = None
    sentry_environment: str | None = None  # default: APP_ENV
    sentry_traces_sample_rate: float = Field(0.0, ge=0.0, le=1.0)
    sentry_sample_rate: float = Field(1.0, ge=0.0, le=1.0)  # share of error events sent

    @field_validator("log_level")
    @classmethod
    def _upper(cls, v: str) -> str:
        from loguru import logger

        try:
            logger.level(v.upper())
        except ValueError:
            raise ValueError(
                "LOG_LEVEL must be one of TRACE, DEBUG, INFO, SUCCESS, WARNING, ERROR, CRITICAL"
            ) from None
        return v.upper()

    @field_validator("database_url")
    @classmethod
    def _database_url(cls, v: str | None) -> str | None:
        if v:  # checked now, so a bad one stops the start before anything is started
            try:
                DatabaseURL.parse(v)
            except ConfigError as exc:
                raise ValueError(str(exc)) from None
        return v or None

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, v: str | None) -> str | None:
        if v:
            parts = urlsplit(v)
            if parts.scheme not in {"redis", "rediss", "unix"}:
                raise ValueError(
                    "REDIS_URL must start with redis://, rediss:// or unix:// "
                    "(redis://host:6379/0 or unix:///path/redis.sock?db=0)"
                )
            if parts.scheme == "unix" and not parts.path:
                raise ValueError("REDIS_URL must name the socket: unix:///path/redis.sock?db=0")
            if parts.scheme != "unix" and not parts.hostname:
                raise ValueError("REDIS_URL must name a host: redis://host:6379/0")
        return v or None

    @model_validator(mode="after")
    def _pool_bounds(self) -> Settings:
        if self.db_pool_min > self.db_pool_max:
            raise ValueError("DB_POOL_MIN must not exceed DB_POOL_MAX")
        return self

    @model_validator(mode="after")
    def _events_bounds(self) -> Settings:  # websocket (issue 7)
        if self.events_max_per_user < self.events_keep_min:
            raise ValueError("EVENTS_MAX_PER_USER must be at least EVENTS_KEEP_MIN")
        return self

    @model_validator(mode="after")
    def _signup_default(self) -> Settings:
        if "signup_credits" not in self.model_fields_set and not self.is_prod:
            self.signup_credits = DEV_SIGNUP_CREDITS
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
        if not self.jwt_keys.get_secret_value() and (secret == DEFAULT_JWT_SECRET or len(secret) < 32):
            problems.append("JWT_SECRET must be set to a random value of at least 32 characters")
        problems += self._auth_problems()
        if self.embedded_db:
            problems.append("DATABASE_URL must point at a real MySQL/MariaDB server")
        if self.embedded_redis:
            problems.append("REDIS_URL must point at a real Redis server")
        if problems:
            raise ConfigError("APP_ENV=prod refuses to start: " + "; ".join(problems))

    def _auth_problems(self) -> list[str]:
        """Prod checks of the auth settings (issue 4)."""
        from server.auth.tokens import parse_jwt_keys

        problems = []
        try:
            keys = parse_jwt_keys(self)
        except ValueError as exc:
            return [str(exc)]
        if self.jwt_keys.get_secret_value() and any(len(k.secret) < 32 for k in keys):
            problems.append("every JWT_KEYS secret must be at least 32 characters")
        if self.sms_provider == "console":
            problems.append(
                "SMS_PROVIDER=console writes codes to the log instead of sending them: "
                "set SMS_PROVIDER=tencent, or disabled when users log in with WeChat only"
            )
        if self.sms_provider == "tencent" and not (
            self.tencent_secret_id
            and self.tencent_secret_key
            and self.tencent_sms_app_id
            and self.tencent_sms_sign_name
            and self.tencent_sms_template_id
        ):
            problems.append(
                "SMS_PROVIDER=tencent needs TENCENT_SECRET_ID, TENCENT_SECRET_KEY, "
                "TENCENT_SMS_APP_ID, TENCENT_SMS_SIGN_NAME and TENCENT_SMS_TEMPLATE_ID"
            )
        return problems


def load_settings(**overrides: object) -> Settings:
    """Settings from the environment; a bad value raises ConfigError with one line naming it."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        raise ConfigError(describe_errors(exc)) from None
    except SettingsError as exc:  # a complex setting (VENDORS) that is not JSON
        raise ConfigError(_describe_settings_error(exc)) from None


def describe_errors(exc: ValidationError) -> str:
    """One line for every bad setting: the environment variable and what it must be."""
    lines: list[str] = []
    for err in exc.errors():
        line = _describe(err)
        if line not in lines:
            lines.append(line)
    return "; ".join(lines)


def _describe(err: Any) -> str:
    loc = [str(part) for part in err["loc"]]
    msg = str(err["msg"]).removeprefix("Value error, ")
    if not loc:  # a check across settings: its message names them
        return msg
    var = loc[0].upper()
    if msg.startswith(var):  # our own validators name the variable
        return msg
    rest = ".".join(loc[1:])
    expected = _expected(loc[0]) if not rest else None
    if expected is None:
        msg = msg[0].lower() + msg[1:] if msg[:1].isupper() else msg
        return f"{var}: {rest + ': ' if rest else ''}{msg}"
    got = err.get("input")
    return f"{var} must be {expected}" + (f", got {got!r}" if isinstance(got, str | int | float) else "")


def _expected(name: str) -> str | None:
    """What a scalar setting takes (from its type and bounds); None for anything else."""
    field = Settings.model_fields.get(name)
    if field is None:
        return None
    ann: Any = field.annotation
    if get_origin(ann) in (Union, types.UnionType):
        args = [a for a in get_args(ann) if a is not type(None)]
        ann = args[0] if len(args) == 1 else ann
    if get_origin(ann) is Literal:
        return "one of " + ", ".join(str(a) for a in get_args(ann))
    if ann is bool:
        return "true or false"
    if ann not in (int, float):
        return None
    what = "an integer" if ann is int else "a number"
    low = next((f"{m.ge}" for m in field.metadata if isinstance(m, Ge)), None)
    high = next((f"{m.le}" for m in field.metadata if isinstance(m, Le)), None)
    if low is not None and high is not None:
        return f"{what} from {low} to {high}"
    bounds = [f"≥ {m.ge}" for m in field.metadata if isinstance(m, Ge)]
    bounds += [f"> {m.gt}" for m in field.metadata if isinstance(m, Gt)]
    bounds += [f"≤ {m.le}" for m in field.metadata if isinstance(m, Le)]
    bounds += [f"< {m.lt}" for m in field.metadata if isinstance(m, Lt)]
    return " ".join([what, *bounds])


def _describe_settings_error(exc: SettingsError) -> str:
    text = str(exc)
    name = text.split('"')[1] if text.count('"') >= 2 else "setting"
    cause = exc.__cause__
    why = f" ({cause})" if isinstance(cause, json.JSONDecodeError) else ""
    return f"{name.upper()} must be JSON{why}"
