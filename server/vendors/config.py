"""Vendor settings: the `VENDORS` setting (JSON), one entry per vendor.

    VENDORS='{"dashscope": {"api_key": "sk-…", "concurrency": 5, "qps": 10},
              "upscaler": {"kind": "http", "base_url": "https://up.example.com/v1",
                           "api_key": "…", "operations": {"upscale": ["image"]}},
              "local": {"concurrency": 2}}'

An entry's `kind` picks the adapter (`local`, `dashscope`, `http`); it defaults to
the entry's name when that is a kind. Every limit left out takes its kind's default
(`KIND_DEFAULTS`): DashScope's follow its published quota for `aitryon` (10 submits a
second, 5 tasks in progress). `local` is always configured; an entry only tunes it.
docs/vendors.md has the table.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Annotated, Any, Final, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, SecretStr

from server.vendors import ImageInput, OperationSpec, ParamKind, ParamSpec

VendorKind = Literal["local", "dashscope", "http"]
_NAME: Final = re.compile(r"[a-z][a-z0-9_-]{0,31}")
DASHSCOPE_BASE_URL: Final = "https://dashscope.aliyuncs.com"
MAX_MANY: Final = 16  # images in a list input (`name[]`) of an http operation


class ParamConfig(BaseModel):
    """One parameter of an http operation (the fields of `ParamSpec`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: ParamKind
    default: Any = None
    required: bool = False
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[str, ...] = ()
    description: str = ""

    def spec(self) -> ParamSpec:
        return ParamSpec(
            self.kind,
            self.default,
            required=self.required,
            minimum=self.minimum,
            maximum=self.maximum,
            choices=self.choices,
            description=self.description,
        )


class HttpOperation(BaseModel):
    """An http operation: its image inputs (`name`, or `name[]` for a list) and parameters."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    inputs: list[str] = Field(min_length=1)
    params: dict[str, ParamConfig] = Field(default_factory=dict)
    description: str = ""


class VendorConfig(BaseModel):
    """One entry of VENDORS. None means "the kind's default" (`KIND_DEFAULTS`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: VendorKind | None = None
    base_url: str | None = None
    api_key: SecretStr | None = None
    model: str | None = None  # dashscope: the try-on model (aitryon, aitryon-plus)
    operations: dict[str, list[str] | HttpOperation] = Field(default_factory=dict)  # http only

    timeout: float | None = Field(None, gt=0)
    concurrency: int | None = Field(None, ge=1, le=256)
    qps: float | None = Field(None, ge=0)  # 0: no limit
    retries: int | None = Field(None, ge=0, le=10)
    backoff: float | None = Field(None, ge=0)
    backoff_max: float | None = Field(None, ge=0)
    mailbox: int | None = Field(None, ge=1, le=100_000)
    queue_timeout: float | None = Field(None, gt=0)
    breaker_threshold: int | None = Field(None, ge=0)
    breaker_cooldown: float | None = Field(None, gt=0)
    poll_interval: float | None = Field(None, gt=0)
    max_result_bytes: int | None = Field(None, ge=1024)


@dataclass(frozen=True, slots=True)
class VendorLimits:
    """A vendor's limits with every default filled in; what the VendorActor runs on."""

    timeout: float  # seconds per attempt (submit, polls and download included)
    concurrency: int  # calls in flight at once
    qps: float  # attempts started per second; 0: no limit
    retries: int  # extra attempts after a retryable failure
    backoff: float  # full jitter: attempt n waits uniform(0, min(backoff_max, backoff * 2**n))
    backoff_max: float
    mailbox: int  # calls waiting for a slot; one more is BUSY at once
    queue_timeout: float  # longest wait for a slot before BUSY
    breaker_threshold: int  # consecutive failed attempts that open the breaker; 0: no breaker
    breaker_cooldown: float  # seconds open before one probe is let through
    poll_interval: float  # between task polls (dashscope, http with task ids)
    max_result_bytes: int  # largest result image accepted


_COMMON: Final[dict[str, Any]] = {
    "timeout": 60.0,
    "concurrency": 4,
    "qps": 0.0,
    "retries": 2,
    "backoff": 0.5,
    "backoff_max": 10.0,
    "mailbox": 100,
    "queue_timeout": 120.0,
    "breaker_threshold": 5,
    "breaker_cooldown": 30.0,
    "poll_interval": 1.0,
    "max_result_bytes": 32 * 1024 * 1024,
}
KIND_DEFAULTS: Final[dict[str, dict[str, Any]]] = {
    # CPU work in a thread pool of `concurrency` threads: about one per core.
    "local": {
        **_COMMON,
        "concurrency": max(1, min(4, os.cpu_count() or 1)),
        "retries": 0,
        "breaker_threshold": 0,
    },
    # aitryon: 10 task submits a second, 5 tasks in progress per account; a try-on
    # takes 15–45 s, so polls every 2 s and an attempt may take 3 minutes.
    "dashscope": {**_COMMON, "timeout": 180.0, "concurrency": 5, "qps": 10.0, "poll_interval": 2.0},
    "http": dict(_COMMON),
}


def limits(config: VendorConfig, kind: str) -> VendorLimits:
    defaults = KIND_DEFAULTS[kind]
    values = {name: getattr(config, name) for name in defaults}
    return VendorLimits(**{name: defaults[name] if v is None else v for name, v in values.items()})


def kind_of(name: str, config: VendorConfig) -> VendorKind:
    if config.kind is not None:
        return config.kind
    if name == "local":
        return "local"
    if name == "dashscope":
        return "dashscope"
    raise ValueError(f"vendor {name!r}: set its kind (local, dashscope or http)")


def _remote(*_: Any, **__: Any) -> bytes:
    raise RuntimeError("remote vendor operations run through their VendorActor, not OperationSpec.run")


def http_operations(name: str, config: VendorConfig) -> dict[str, OperationSpec]:
    """The OperationSpecs an http vendor declares in its `operations`."""
    out: dict[str, OperationSpec] = {}
    for op, decl in config.operations.items():
        if not _NAME.fullmatch(op):
            raise ValueError(f"vendor {name!r}: operation name {op!r} must match {_NAME.pattern}")
        declared = decl if isinstance(decl, HttpOperation) else HttpOperation(inputs=decl)
        inputs = []
        for raw in declared.inputs:
            many = raw.endswith("[]")
            input_name = raw.removesuffix("[]")
            if not _NAME.fullmatch(input_name):
                raise ValueError(f"vendor {name!r}: operation {op!r}: bad input name {raw!r}")
            inputs.append(ImageInput(input_name, many=many, max_count=MAX_MANY if many else 1))
        if len({i.name for i in inputs}) != len(inputs):
            raise ValueError(f"vendor {name!r}: operation {op!r} names an input twice")
        params = {p: c.spec() for p, c in declared.params.items()}
        out[op] = OperationSpec(op, declared.description or f"{name}: {op}", tuple(inputs), params, _remote)
    return out


def check_vendors(vendors: dict[str, VendorConfig]) -> dict[str, VendorConfig]:
    """VENDORS as configured plus `local`; ValueError naming the first bad entry."""
    out = dict(vendors)
    out.setdefault("local", VendorConfig(kind="local"))
    for name, config in out.items():
        if not _NAME.fullmatch(name):
            raise ValueError(f"vendor name {name!r} must match {_NAME.pattern}")
        kind = kind_of(name, config)
        if name == "local" and kind != "local":
            raise ValueError("vendor 'local' is the built-in Pillow vendor; its kind must be local")
        if kind == "dashscope" and not (config.api_key and config.api_key.get_secret_value()):
            raise ValueError(f"vendor {name!r} (dashscope) needs an api_key")
        if kind == "http":
            if not config.base_url:
                raise ValueError(f"vendor {name!r} (http) needs a base_url")
            if not config.operations:
                raise ValueError(f'vendor {name!r} (http) needs operations, e.g. {{"upscale": ["image"]}}')
            http_operations(name, config)
        if config.base_url and not config.base_url.startswith(("http://", "https://")):
            raise ValueError(f"vendor {name!r}: base_url must start with http:// or https://")
        lim = limits(config, kind)
        if lim.backoff_max < lim.backoff:
            raise ValueError(f"vendor {name!r}: backoff_max must not be below backoff")
    return out


#: The type of Settings.vendors: parsed from JSON in the environment, checked at load.
VendorsSetting = Annotated[dict[str, VendorConfig], AfterValidator(check_vendors)]
