"""AI vendors and the vocabulary that describes their operations.

Each vendor module exposes `OPERATIONS: dict[str, OperationSpec]`. A spec names the
operation's image inputs and its parameters, so a pipeline definition can be checked
("does this operation exist, are these parameter names and values right") when it is
loaded or when a task is created, long before any vendor is called.

`local` (server/vendors/local.py) is the built-in vendor: plain Pillow image work,
honestly not AI, so every pipeline runs end to end without a vendor account.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

ParamKind = Literal["int", "float", "str", "bool", "choice", "color"]
ImageInputs = Mapping[str, bytes | Sequence[bytes]]

_COLOR: Final = re.compile(r"#[0-9a-fA-F]{6}")


@dataclass(frozen=True, slots=True)
class ParamSpec:
    """One parameter: its kind, default (None: optional with no value) and bounds."""

    kind: ParamKind
    default: Any = None
    required: bool = False
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[str, ...] = ()
    max_length: int = 200
    description: str = ""

    def check(self, where: str, value: Any) -> Any:
        """`value` as the operation will use it, or ValueError saying what is wrong."""
        if self.kind == "bool":
            if not isinstance(value, bool):
                raise ValueError(f"{where} must be true or false, got {value!r}")
            return value
        if self.kind in ("int", "float"):
            ok = isinstance(value, int) or (self.kind == "float" and isinstance(value, float))
            if isinstance(value, bool) or not ok or (isinstance(value, float) and not math.isfinite(value)):
                raise ValueError(
                    f"{where} must be a{'n integer' if self.kind == 'int' else ' number'}, got {value!r}"
                )
            if self.minimum is not None and value < self.minimum:
                raise ValueError(f"{where} must be at least {self.minimum:g}, got {value!r}")
            if self.maximum is not None and value > self.maximum:
                raise ValueError(f"{where} must be at most {self.maximum:g}, got {value!r}")
            return float(value) if self.kind == "float" else value
        if not isinstance(value, str):
            raise ValueError(f"{where} must be a string, got {value!r}")
        if self.kind == "choice" and value not in self.choices:
            raise ValueError(f"{where} must be one of {', '.join(self.choices)}; got {value!r}")
        if self.kind == "color" and not _COLOR.fullmatch(value):
            raise ValueError(f"{where} must be a colour like #ff8800, got {value!r}")
        if self.kind == "str" and not (0 < len(value) <= self.max_length and value.isprintable()):
            raise ValueError(f"{where} must be 1–{self.max_length} printable characters")
        return value

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": self.kind, "required": self.required, "default": self.default}
        if self.minimum is not None:
            out["minimum"] = self.minimum
        if self.maximum is not None:
            out["maximum"] = self.maximum
        if self.choices:
            out["choices"] = list(self.choices)
        if self.description:
            out["description"] = self.description
        return out


@dataclass(frozen=True, slots=True)
class ImageInput:
    """A named image input; `many` inputs take a list of `min_count`–`max_count` images."""

    name: str
    many: bool = False
    min_count: int = 1
    max_count: int = 1
    description: str = ""


@dataclass(frozen=True, slots=True, eq=False)
class OperationSpec:
    """What one vendor operation takes, what it returns, and the function that runs it."""

    name: str
    description: str
    inputs: tuple[ImageInput, ...]
    params: Mapping[str, ParamSpec]
    run: Callable[..., bytes]
    fixed_output: str | None = None  # content type when there is no `format` parameter

    def validate_params(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """Every parameter with its default filled in, or ValueError for a bad name or value."""
        unknown = sorted(set(params) - set(self.params))
        if unknown:
            raise ValueError(
                f"{self.name}: unknown parameter {', '.join(map(repr, unknown))} "
                f"(expected: {', '.join(self.params) or 'none'})"
            )
        out: dict[str, Any] = {}
        for name, spec in self.params.items():
            value = params.get(name)
            if value is None:
                if spec.required:
                    raise ValueError(f"{self.name}: parameter {name!r} is required")
                out[name] = spec.default
            else:
                out[name] = spec.check(f"{self.name}: parameter {name!r}", value)
        return out

    def validate_input_names(self, names: Sequence[str]) -> None:
        """ValueError unless `names` are exactly this operation's inputs."""
        expected = {i.name for i in self.inputs}
        if set(names) != expected:
            got = ", ".join(sorted(names)) or "none"
            raise ValueError(f"{self.name}: takes inputs {', '.join(sorted(expected))}; got {got}")

    def validate_inputs(self, inputs: ImageInputs) -> dict[str, bytes | list[bytes]]:
        self.validate_input_names(list(inputs))
        out: dict[str, bytes | list[bytes]] = {}
        for spec in self.inputs:
            value = inputs[spec.name]
            if spec.many:
                if isinstance(value, bytes | bytearray) or not all(isinstance(v, bytes) for v in value):
                    raise ValueError(f"{self.name}: input {spec.name!r} must be a list of images")
                if not spec.min_count <= len(value) <= spec.max_count:
                    raise ValueError(
                        f"{self.name}: input {spec.name!r} takes {spec.min_count}–{spec.max_count} images, "
                        f"got {len(value)}"
                    )
                out[spec.name] = list(value)
            elif isinstance(value, bytes):
                out[spec.name] = value
            else:
                raise ValueError(f"{self.name}: input {spec.name!r} must be one image")
        return out

    def output_content_type(self, params: Mapping[str, Any]) -> str:
        if self.fixed_output is not None:
            return self.fixed_output
        return "image/jpeg" if params.get("format") == "jpeg" else "image/png"

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "inputs": [
                {"name": i.name, "many": i.many, "min": i.min_count, "max": i.max_count} for i in self.inputs
            ],
            "params": {name: p.describe() for name, p in self.params.items()},
        }
