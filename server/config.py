"""Configuration from the environment (and `.env`), validated at start.

Settings are grouped by area (`settings.db`, `settings.tasks`, …); every field is still
one environment variable with the flat name the README's configuration table lists
(`settings.tasks.timeout` is TASK_TIMEOUT, `settings.auth.access_token_ttl` is
ACCESS_TOKEN_TTL): `Group.env_name` says which.
"""

from __future__ import annotations

import json
import types
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any, ClassVar, Literal, Union, get_args, get_origin
from urllib.parse import parse_qs, unquote, urlsplit

from annotated_types import Ge, Gt, Le, Lt
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, SettingsError

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

    def __repr__(self) -> str:
        where = self.unix_socket or f"{self.host}:{self.port}"
        return f"DatabaseURL({self.user}@{where}/{self.database})"


SENTINEL_SCHEME = "redis+sentinel"
SENTINEL_SHAPE = "redis+sentinel://[:password@]host:26379,host:26379/mymaster/0"


@dataclass(frozen=True, slots=True)
class SentinelURL:
    """A parsed REDIS_URL of the redis+sentinel scheme."""

    sentinels: tuple[tuple[str, int], ...]
    service: str
    db: int
    username: str | None
    password: str | None
    sentinel_auth: bool  # the sentinels want the password too

    @classmethod
    def parse(cls, url: str) -> SentinelURL:
        """Raises ValueError naming REDIS_URL and the expected shape."""
        parts = urlsplit(url)
        if parts.scheme != SENTINEL_SCHEME:
            raise ValueError(f"REDIS_URL is not a {SENTINEL_SCHEME}:// URL ({SENTINEL_SHAPE})")
        userinfo, _, hosts = parts.netloc.rpartition("@")
        username, _, password = userinfo.partition(":")
        sentinels = []
        for item in hosts.split(","):
            host, _, port = item.strip().rpartition(":")
            host = host.strip("[]")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(
                    f"REDIS_URL must list the sentinels as host:port,host:port ({SENTINEL_SHAPE})"
                )
            sentinels.append((host, int(port)))
        path = [p for p in parts.path.split("/") if p]
        if not path or len(path) > 2 or (len(path) == 2 and not path[1].isdigit()):
            raise ValueError(
                f"REDIS_URL must name the sentinel service and optionally a db number ({SENTINEL_SHAPE})"
            )
        query = parse_qs(parts.query)
        return cls(
            sentinels=tuple(sentinels),
            service=unquote(path[0]),
            db=int(path[1]) if len(path) == 2 else 0,
            username=unquote(username) or None,
            password=unquote(password) or None,
            sentinel_auth=query.get("sentinel_password", ["0"])[0] in {"1", "true", "yes"},
        )


class Group(BaseModel):
    """The settings of one area. Each field is read from one environment variable:
    `prefix + FIELD` in upper case, unless `env_names` names it otherwise."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    prefix: ClassVar[str] = ""
    env_names: ClassVar[dict[str, str]] = {}

    @classmethod
    def env_name(cls, field: str) -> str:
        return cls.env_names.get(field) or (cls.prefix + field).upper()


class DbSettings(Group):
    """The MySQL pool. Sizing rule: instances × DB_POOL_MAX ≤ 80 % of max_connections."""

    prefix: ClassVar[str] = "DB_"
    pool_min: int = Field(1, ge=0)
    pool_max: int = Field(20, ge=1)
    pool_recycle: int = Field(3600, ge=-1)
    connect_timeout: float = Field(5.0, gt=0)
    acquire_timeout: float = Field(3.0, gt=0)

    @model_validator(mode="after")
    def _bounds(self) -> DbSettings:
        if self.pool_min > self.pool_max:
            raise ValueError("DB_POOL_MIN must not exceed DB_POOL_MAX")
        return self


class RedisSettings(Group):
    prefix: ClassVar[str] = "REDIS_"
    password: SecretStr | None = None  # when REDIS_URL does not carry one (docs/deploy.md)
    timeout: float = Field(3.0, gt=0)  # any Redis call
    max_connections: int = Field(100, ge=1)  # pool bound per process; beyond it waits, then BUSY


class HttpSettings(Group):
    """The HTTP edge (docs/infrastructure.md)."""

    env_names: ClassVar[dict[str, str]] = {"max_field_size": "HTTP_MAX_FIELD_SIZE"}
    client_max_size: int = 12 * 1024 * 1024
    json_body_max: int = 256 * 1024
    request_body_timeout: float = Field(30.0, gt=0)  # a body not fully received by then: 408
    max_field_size: int = Field(16 * 1024, ge=8190)  # longest header value aiohttp parses
    # Browser Origins that may call /api/ from their pages (CORS), comma separated ("*": any).
    cors_allowed_origins: str = ""
    # Hops of trusted reverse proxies in front of us: the client IP is read from
    # X-Forwarded-For that many entries from the right (0: the socket peer).
    trusted_proxy_hops: int = Field(0, ge=0)


class AuthSettings(Group):
    """Tokens, passwords, login limits, the profile cache (docs/auth.md)."""

    env_names: ClassVar[dict[str, str]] = {"hash_threads": "AUTH_HASH_THREADS"}
    jwt_secret: SecretStr = SecretStr(DEFAULT_JWT_SECRET)
    # JWT signing keys as "kid:secret,kid:secret", newest first: the first signs, all verify.
    # Unset: JWT_SECRET alone, under the kid "default" (a kid never derives from its secret).
    jwt_keys: SecretStr = SecretStr("")
    access_token_ttl: int = Field(900, ge=60)
    refresh_token_ttl: int = Field(604800, ge=300)
    # argon2id cost (defaults: RFC 9106 low-memory profile, see server/auth/passwords.py).
    argon2_time_cost: int = Field(3, ge=1)
    argon2_memory_kib: int = Field(64 * 1024, ge=8)
    argon2_parallelism: int = Field(1, ge=1)
    hash_threads: int = Field(2, ge=1)
    # Failed logins: per phone (locks the account) and per IP (rate limit), in one window.
    login_max_failures: int = Field(5, ge=1)
    login_ip_max_failures: int = Field(50, ge=1)
    login_failure_window: int = Field(900, ge=1)
    profile_cache_ttl: int = Field(3600, ge=1)
    # Hot profiles also kept in each process, exact across processes (server/auth/nearcache.py).
    profile_local_cache_size: int = Field(10_000, ge=0)
    profile_local_cache_ttl: float = Field(30.0, gt=0)


class SmsSettings(Group):
    """SMS codes: life, wrong tries, send limits, and the Tencent Cloud SMS account."""

    prefix: ClassVar[str] = "SMS_"
    env_names: ClassVar[dict[str, str]] = {
        f"tencent_{name}": f"TENCENT_SMS_{name.upper()}"
        for name in ("app_id", "sign_name", "template_id", "region", "endpoint", "timeout")
    }
    provider: Literal["console", "tencent", "disabled"] = "console"
    code_ttl: int = Field(300, ge=30)
    code_max_tries: int = Field(5, ge=1)
    resend_interval: int = Field(60, ge=0)
    daily_cap: int = Field(10, ge=1)
    ip_limit: int = Field(30, ge=1)
    ip_window: int = Field(3600, ge=1)
    tencent_app_id: str | None = None
    tencent_sign_name: str | None = None
    tencent_template_id: str | None = None
    tencent_region: str = "ap-guangzhou"
    tencent_endpoint: str = "https://sms.tencentcloudapi.com"
    tencent_timeout: int = Field(10, ge=1)


class WechatSettings(Group):
    """Mini-program login (jscode2session)."""

    prefix: ClassVar[str] = "WECHAT_"
    appid: str | None = None
    secret: SecretStr | None = None
    api_base: str = "https://api.weixin.qq.com"
    timeout: float = Field(5.0, gt=0)


class ActorSettings(Group):
    """The actor runtime (docs/actors.md)."""

    prefix: ClassVar[str] = "ACTOR_"
    ask_timeout: float = Field(10.0, gt=0)  # default bound of an ask
    idle_seconds: float = Field(300.0, gt=0)  # a keyed actor (a user's) stops after this idle
    stop_timeout: float = Field(5.0, gt=0)  # drain at shutdown (actors and task runs)


class TaskSettings(Group):
    """Task runs (docs/tasks.md)."""

    prefix: ClassVar[str] = "TASK_"
    concurrency: int = Field(16, ge=1)  # task runs in flight per process
    pending: int = Field(256, ge=1)  # waiting beyond that; more answers BUSY
    timeout: float = Field(600.0, gt=0)  # a run taking longer fails, credits returned
    lease_ttl: float = Field(15.0, gt=0)  # renewed every third of it while running
    max_attempts: int = Field(2, ge=1)  # runs of one task, recovery included


class StorageSettings(Group):
    """Object storage (docs/storage.md). local: files under VAR_DIR/storage served by
    GET /files/{key}; cos: Tencent Cloud COS."""

    prefix: ClassVar[str] = "STORAGE_"
    env_names: ClassVar[dict[str, str]] = {
        **{
            f"cos_{name}": f"COS_{name.upper()}"
            for name in (
                "region", "bucket", "secret_id", "secret_key", "scheme", "domain",
                "timeout", "retries", "threads", "max_pending",
            )
        },
        "orphan_file_min_age": "ORPHAN_FILE_MIN_AGE",
        "output_retention_days": "OUTPUT_RETENTION_DAYS",
    }  # fmt: skip
    backend: Literal["local", "cos"] = "local"
    # Signs /files URLs (HMAC-SHA256). Empty: derived from JWT_SECRET with HKDF.
    url_secret: SecretStr | None = None
    url_ttl: int = Field(3600, ge=60)  # life of the URLs in API answers
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
    # The nightly orphan-file cleanup never deletes an asset file younger than this.
    orphan_file_min_age: int = Field(86_400, ge=3600)
    # Retention classes (docs/storage.md): task outputs are deleted OUTPUT_RETENTION_DAYS after
    # they were made unless the user keeps them; the cost figures price storage at
    # STORAGE_PRICE_PER_GB_MONTH CNY per GB (1024³ bytes) and month (COS standard storage).
    output_retention_days: int = Field(30, ge=1)
    price_per_gb_month: float = Field(0.118, ge=0)


class WsSettings(Group):
    """The WebSocket and the per-user event streams (docs/websocket.md)."""

    prefix: ClassVar[str] = "WS_"
    env_names: ClassVar[dict[str, str]] = {
        f"events_{name}": f"EVENTS_{name.upper()}" for name in ("retention_hours", "keep_min", "max_per_user")
    }
    # Browser Origins allowed to open /api/v1/ws, comma separated ("*": any). A request
    # without Origin (mini-program, native app) and a page of this same host always pass.
    allowed_origins: str = ""
    auth_timeout: float = Field(10.0, gt=0)  # seconds to send the auth frame, else 4408
    heartbeat: float = Field(25.0, gt=0)  # ping interval; no pong within half of it closes
    queue_size: int = Field(256, ge=1)  # frames waiting for one socket before 4429 (too slow)
    send_timeout: float = Field(10.0, gt=0)  # one frame may take this long to write, else 4429
    close_timeout: float = Field(5.0, gt=0)  # closing handshake; then the socket is dropped
    max_per_user: int = Field(10, ge=1)  # sockets of one user on one process, else 4429
    max_connections: int = Field(10_000, ge=1)  # sockets on one process, else 4429
    max_frame: int = Field(16 * 1024, ge=1024)  # largest client frame (bytes)
    expiry_warning: float = Field(60.0, ge=0)  # auth.expiring this long before the token's exp
    # Event retention per user: every event of the last EVENTS_RETENTION_HOURS and at
    # least the last EVENTS_KEEP_MIN, whichever is more, up to EVENTS_MAX_PER_USER.
    events_retention_hours: float = Field(24.0, gt=0)
    events_keep_min: int = Field(1000, ge=1)
    events_max_per_user: int = Field(100_000, ge=1)

    @model_validator(mode="after")
    def _events_bounds(self) -> WsSettings:
        if self.events_max_per_user < self.events_keep_min:
            raise ValueError("EVENTS_MAX_PER_USER must be at least EVENTS_KEEP_MIN")
        return self


class PaymentSettings(Group):
    """Orders and the payment providers (docs/payments.md); a channel is offered only when
    all of its provider's settings are present."""

    order_ttl: int = Field(1800, ge=60)  # a pending order closes after this many seconds
    # A pending order read this long after its creation asks the provider, at most once per
    # this many seconds per order (API.md: 10 s).
    order_query_interval: float = Field(10.0, gt=0)
    wechatpay_mchid: str | None = None
    wechatpay_appid: str | None = None  # default WECHAT_APPID
    wechatpay_private_key: Path | None = None  # the merchant's PKCS#8 PEM file
    wechatpay_cert_serial_no: str | None = None
    wechatpay_apiv3_key: SecretStr | None = None
    wechatpay_public_key: Path | None = None  # WeChat Pay's platform public key PEM file
    wechatpay_public_key_id: str | None = None
    wechatpay_api_base: str = "https://api.mch.weixin.qq.com"
    wechatpay_threads: int = Field(8, ge=1)  # threads running the (blocking) SDK
    wechatpay_max_pending: int = Field(64, ge=1)  # running + queued SDK calls before BUSY
    wechatpay_timeout: float = Field(20.0, gt=0)  # a whole SDK call (connect 5 s + read 15 s)
    alipay_appid: str | None = None
    alipay_private_key: Path | None = None  # the app's RSA2 private key PEM file
    alipay_public_key: Path | None = None  # Alipay's public key PEM file
    alipay_gateway: str = "https://openapi.alipay.com/gateway.do"
    alipay_threads: int = Field(8, ge=1)  # threads running the (blocking) SDK
    alipay_max_pending: int = Field(64, ge=1)  # running + queued SDK calls before BUSY
    alipay_timeout: float = Field(20.0, gt=0)  # a whole SDK call (each HTTP request: 15 s)


class VendorSettings(Group):
    """What every vendor shares (VENDORS configures each one; docs/vendors.md)."""

    prefix: ClassVar[str] = "VENDOR_"
    input_url_ttl: int = Field(3600, ge=60)  # life of the signed URLs DashScope fetches inputs from
    # Remote vendors' concurrency and qps hold cluster-wide through Redis: a crashed
    # instance's permits return after VENDOR_LEASE_TTL seconds; with Redis down each instance
    # uses concurrency // VENDOR_EXPECTED_INSTANCES (at least 1) and qps / the same.
    lease_ttl: float = Field(15.0, ge=1.0, le=600.0)
    expected_instances: int = Field(1, ge=1, le=1000)


class SentrySettings(Group):
    """Error tracking (optional; docs/ops.md): off unless SENTRY_DSN is set."""

    prefix: ClassVar[str] = "SENTRY_"
    dsn: str | None = None
    environment: str | None = None  # default: APP_ENV
    traces_sample_rate: float = Field(0.0, ge=0.0, le=1.0)
    sample_rate: float = Field(1.0, ge=0.0, le=1.0)  # share of error events sent


class PiiSettings(Group):
    """Personal data (docs/pii.md): the KMS that holds the key-encryption keys, and the
    blind index key. `local`: a versioned key ring file (KMS_LOCAL_KEYRING; unset in dev
    and test: VAR_DIR/keyring.json, created on first start; prod: must exist, mode 0600).
    `tencent`: Tencent Cloud KMS (KMS_KEY_ID, KMS_REGION, KMS_SECRET_ID, KMS_SECRET_KEY)."""

    prefix: ClassVar[str] = "KMS_"
    env_names: ClassVar[dict[str, str]] = {"blind_index_key": "BLIND_INDEX_KEY"}
    provider: Literal["local", "tencent"] = "local"
    local_keyring: Path | None = None
    key_id: str | None = None
    region: str = "ap-guangzhou"
    secret_id: str | None = None
    secret_key: SecretStr | None = None
    endpoint: str = "https://kms.tencentcloudapi.com"
    timeout: float = Field(5.0, gt=0)  # one KMS call (the SDK's request timeout is its ceiling)
    threads: int = Field(4, ge=1)  # threads running the (blocking) SDK
    # HMAC key of the ID-number blind index (≥ 32 characters). Unset with KMS_PROVIDER=local:
    # the key ring's own. Changing it orphans every stored index.
    blind_index_key: SecretStr | None = None


class DistributorSettings(Group):
    """Distributor commissions (docs/pii.md)."""

    env_names: ClassVar[dict[str, str]] = {
        "commission_rate": "DISTRIBUTOR_COMMISSION_RATE",
        "settle_days": "COMMISSION_SETTLE_DAYS",
    }
    commission_rate: Decimal = Field(Decimal("0.10"), ge=0, le=1)  # default rate (per-distributor override)
    settle_days: int = Field(7, ge=0)  # a commission stays pending (reversible) this long


#: Settings field → its group model. Each group reads its own variables (Group.env_name).
GROUPS: dict[str, type[Group]] = {
    "db": DbSettings,
    "redis": RedisSettings,
    "http": HttpSettings,
    "auth": AuthSettings,
    "sms": SmsSettings,
    "wechat": WechatSettings,
    "actors": ActorSettings,
    "tasks": TaskSettings,
    "storage": StorageSettings,
    "ws": WsSettings,
    "payments": PaymentSettings,
    "vendor": VendorSettings,
    "sentry": SentrySettings,
    "pii": PiiSettings,  # issue 13
    "distributors": DistributorSettings,  # issue 13
}

#: flat variable name (lower case) → (group, field), e.g. "db_pool_max" → ("db", "pool_max").
FLAT: dict[str, tuple[str, str]] = {
    cls.env_name(field).lower(): (group, field) for group, cls in GROUPS.items() for field in cls.model_fields
}


class _GroupedEnv(PydanticBaseSettingsSource):
    """Every group's fields from their flat variables (the environment over `.env`)."""

    def __init__(self, settings_cls: type[BaseSettings], *sources: PydanticBaseSettingsSource) -> None:
        super().__init__(settings_cls)
        self.values: dict[str, str | None] = {}
        for source in sources:  # lowest priority first
            self.values.update(getattr(source, "env_vars", {}))

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        out: dict[str, dict[str, Any]] = {}
        for flat, (group, field) in FLAT.items():
            if self.values.get(flat) is not None:
                out.setdefault(group, {})[field] = self.values[flat]
        return out


class Settings(BaseSettings):
    """Every setting, read from environment variables of the same names in upper case
    (or `.env`); the areas are groups (`settings.db.pool_max` is DB_POOL_MAX). Keyword
    arguments may use the flat names too: `Settings(db_pool_max=5)`."""

    model_config = SettingsConfigDict(env_file=".env", env_file_encoding="utf-8", extra="ignore")

    app_env: Literal["dev", "test", "prod"] = "dev"
    host: str = "0.0.0.0"
    port: int = Field(8080, ge=0, le=65535)
    public_base_url: str | None = None
    log_level: str = "INFO"
    var_dir: Path = ROOT / "var"
    database_url: str | None = None
    redis_url: str | None = None
    migrate_on_start: bool = True
    shutdown_timeout: float = Field(5.0, ge=0)
    cron_enabled: bool = True  # cron jobs (sweeper, recovery, …); off in tests that drive them by hand
    admin_phone: str | None = None
    admin_password: SecretStr | None = None
    # Credits every new account starts with. Unset: 0 in prod, DEV_SIGNUP_CREDITS in dev and
    # test, so a new user can try every seeded feature (see _signup_default).
    signup_credits: int = Field(0, ge=0, le=100_000)
    # Tencent Cloud API credentials (SMS; shared by every Tencent Cloud client).
    tencent_secret_id: str | None = None
    tencent_secret_key: SecretStr | None = None
    # VENDORS: JSON {name: {kind, base_url, api_key, concurrency, qps, timeout, retries,
    # mailbox, breaker_threshold, …}}; limits left out take their kind's default. The
    # built-in `local` vendor is always there (an entry only tunes its limits).
    vendors: VendorsSetting = Field(default_factory=dict, validate_default=True)

    db: DbSettings = DbSettings()
    redis: RedisSettings = RedisSettings()
    http: HttpSettings = HttpSettings()
    auth: AuthSettings = AuthSettings()
    sms: SmsSettings = SmsSettings()
    wechat: WechatSettings = WechatSettings()
    actors: ActorSettings = ActorSettings()
    tasks: TaskSettings = TaskSettings()
    storage: StorageSettings = StorageSettings()
    ws: WsSettings = WsSettings()
    payments: PaymentSettings = PaymentSettings()
    vendor: VendorSettings = VendorSettings()
    sentry: SentrySettings = SentrySettings()
    pii: PiiSettings = PiiSettings()
    distributors: DistributorSettings = DistributorSettings()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        grouped = _GroupedEnv(settings_cls, dotenv_settings, env_settings)
        return init_settings, env_settings, dotenv_settings, grouped, file_secret_settings

    @model_validator(mode="before")
    @classmethod
    def _nest_flat_names(cls, data: Any) -> Any:
        """`Settings(task_timeout=5)` means `tasks.timeout`; a flat keyword wins over the
        environment's value of the same setting."""
        if not isinstance(data, dict):
            return data
        out = dict(data)
        for key in list(out):
            where = FLAT.get(key)
            if where is not None:
                group, field = where
                nested = out.get(group)
                if isinstance(nested, BaseModel):
                    nested = nested.model_dump()
                nested = dict(nested) if isinstance(nested, dict) else {}
                nested[field] = out.pop(key)
                out[group] = nested
        return out

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
            if parts.scheme == "redis+sentinel":  # Sentinel (issue 15)
                SentinelURL.parse(v)
                return v
            if parts.scheme not in {"redis", "rediss", "unix"}:
                raise ValueError(
                    "REDIS_URL must start with redis://, rediss:// or unix://, or redis+sentinel:// "
                    "(redis://host:6379/0, unix:///path/redis.sock?db=0 or "
                    "redis+sentinel://host:26379,host:26379/mymaster/0)"
                )
            if parts.scheme == "unix" and not parts.path:
                raise ValueError("REDIS_URL must name the socket: unix:///path/redis.sock?db=0")
            if parts.scheme != "unix" and not parts.hostname:
                raise ValueError("REDIS_URL must name a host: redis://host:6379/0")
        return v or None

    @model_validator(mode="after")
    def _signup_default(self) -> Settings:
        if "signup_credits" not in self.model_fields_set and not self.is_prod:
            self.signup_credits = DEV_SIGNUP_CREDITS
        return self

    def updated(self, **changes: Any) -> Settings:
        """A validated copy with `changes`, by flat name (`sms_ip_limit=1`) or field.
        (`model_copy(update=...)` neither validates nor knows the flat names.)"""
        data: dict[str, Any] = {name: getattr(self, name) for name in type(self).model_fields}
        return type(self).model_validate({**data, **changes})

    @property
    def is_prod(self) -> bool:
        return self.app_env == "prod"

    @property
    def embedded_db(self) -> bool:
        return not self.database_url

    @property
    def embedded_redis(self) -> bool:
        return not self.redis_url

    def database(self) -> DatabaseURL:
        if not self.database_url:
            raise ConfigError("DATABASE_URL is not set and no embedded MariaDB was started")
        return DatabaseURL.parse(self.database_url)

    def check_for_start(self) -> None:
        """Refuse configurations that must never serve production traffic."""
        if not self.is_prod:
            return
        problems = []
        secret = self.auth.jwt_secret.get_secret_value()
        if not self.auth.jwt_keys.get_secret_value() and (secret == DEFAULT_JWT_SECRET or len(secret) < 32):
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
        if self.auth.jwt_keys.get_secret_value() and any(len(k.secret) < 32 for k in keys):
            problems.append("every JWT_KEYS secret must be at least 32 characters")
        if self.sms.provider == "console":
            problems.append(
                "SMS_PROVIDER=console writes codes to the log instead of sending them: "
                "set SMS_PROVIDER=tencent, or disabled when users log in with WeChat only"
            )
        if self.sms.provider == "tencent" and not (
            self.tencent_secret_id
            and self.tencent_secret_key
            and self.sms.tencent_app_id
            and self.sms.tencent_sign_name
            and self.sms.tencent_template_id
        ):
            problems.append(
                "SMS_PROVIDER=tencent needs TENCENT_SECRET_ID, TENCENT_SECRET_KEY, "
                "TENCENT_SMS_APP_ID, TENCENT_SMS_SIGN_NAME and TENCENT_SMS_TEMPLATE_ID"
            )
        return problems


KMS_SECRET_PREFIX = "kms:"  # a secret setting given as kms:<ciphertext> (docs/pii.md)


def kms_secrets(settings: Settings) -> dict[str, str]:
    """Every secret setting given as `kms:<ciphertext>`: flat name → ciphertext. Whoever
    opens the KMS decrypts them and makes `settings.updated(**plaintexts)` (server/pii)."""
    found: dict[str, str] = {}

    def check(value: Any, flat: str) -> None:
        if isinstance(value, SecretStr) and value.get_secret_value().startswith(KMS_SECRET_PREFIX):
            found[flat] = value.get_secret_value().removeprefix(KMS_SECRET_PREFIX)

    for name in type(settings).model_fields:
        value = getattr(settings, name)
        if name in GROUPS:
            for field in GROUPS[name].model_fields:
                check(getattr(value, field), GROUPS[name].env_name(field).lower())
        else:
            check(value, name)
    return found


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
    model: type[BaseModel] = Settings
    if loc and loc[0] in GROUPS:  # a grouped setting: ("tasks", "timeout") is TASK_TIMEOUT
        group = GROUPS[loc[0]]
        if len(loc) == 1:  # a check across the group's settings: its message names them
            return msg
        model, loc = group, [group.env_name(loc[1]), *loc[2:]]
    if not loc:  # a check across settings: its message names them
        return msg
    var = loc[0].upper()
    if msg.startswith(var):  # our own validators name the variable
        return msg
    rest = ".".join(loc[1:])
    expected = _expected(model, loc[0]) if not rest else None
    if expected is None:
        msg = msg[0].lower() + msg[1:] if msg[:1].isupper() else msg
        return f"{var}: {rest + ': ' if rest else ''}{msg}"
    got = err.get("input")
    return f"{var} must be {expected}" + (f", got {got!r}" if isinstance(got, str | int | float) else "")


def _expected(model: type[BaseModel], name: str) -> str | None:
    """What a scalar setting takes (from its type and bounds); None for anything else."""
    if issubclass(model, Group):
        name = next((f for f in model.model_fields if model.env_name(f) == name.upper()), name)
    field = model.model_fields.get(name.lower())
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
