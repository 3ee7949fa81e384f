"""Feature pipelines: a DAG of vendor calls with FORK/JOIN, as JSON, checked when saved.

    {"steps": [
       {"id": "cut", "type": "call", "vendor": "local", "operation": "matting",
        "inputs": {"image": "$input.garment"}},
       {"id": "looks", "type": "fork", "branches": [
          {"id": "mono", "type": "call", "vendor": "local", "operation": "style",
           "inputs": {"image": "$steps.cut"}, "params": {"filter": "mono"}}, ...]},
       {"id": "sheet", "type": "join", "fork": "looks", "mode": "all",
        "combiner": {"vendor": "local", "operation": "grid", "input": "images"}}],
     "output": "sheet"}

A step may only reference task inputs (`$input.<name>`) and earlier steps
(`$steps.<id>`), so the list order is a topological order and cycles cannot be
written. A fork's branches run in parallel; its join waits for `all` of them,
for `any` (every success, failures tolerated while one succeeds), or for
`first_success` (the first success wins; the rest are cancelled). A join's output
is its combiner's output, or the winning/only branch output when it has none.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    TypeAdapter,
    ValidationError,
    model_serializer,
)

from server.errors import AppError, field_errors, validation_failed
from server.vendors import OperationSpec

StepId = Annotated[str, Field(pattern=r"^[a-z][a-z0-9_-]{0,31}$")]
Catalog = Mapping[str, Mapping[str, OperationSpec]]  # vendor -> operation -> spec


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CallStep(_Strict):
    id: StepId
    type: Literal["call"] = "call"
    vendor: str
    operation: str
    inputs: dict[str, str | list[str]] = Field(default_factory=dict)
    params: dict[str, Any] = Field(default_factory=dict)

    @model_serializer(mode="wrap")
    def _with_type(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """`type` even under `exclude_defaults`: a top-level step is parsed by its type, so
        a pipeline dumped without it would not parse again (GET /admin/features → PATCH)."""
        return {"id": self.id, "type": self.type, **handler(self)}


class ForkStep(_Strict):
    id: StepId
    type: Literal["fork"]
    branches: list[CallStep] = Field(min_length=2, max_length=16)


class Combiner(_Strict):
    vendor: str
    operation: str
    input: str = Field(description="the combiner's list input that receives the branch outputs")
    params: dict[str, Any] = Field(default_factory=dict)


class JoinStep(_Strict):
    id: StepId
    type: Literal["join"]
    fork: str
    mode: Literal["all", "any", "first_success"] = "all"
    combiner: Combiner | None = None


Step = Annotated[CallStep | ForkStep | JoinStep, Field(discriminator="type")]


class Pipeline(_Strict):
    steps: list[Step] = Field(min_length=1, max_length=32)
    output: str

    def step(self, step_id: str) -> CallStep | ForkStep | JoinStep:
        for s in self.steps:
            if s.id == step_id:
                return s
        raise KeyError(step_id)

    def call_count(self) -> int:
        n = 0
        for s in self.steps:
            n += (
                len(s.branches)
                if isinstance(s, ForkStep)
                else 1
                if isinstance(s, CallStep)
                else bool(s.combiner)
            )
        return n


_ADAPTER = TypeAdapter(Pipeline)


def _ref_names(value: str | list[str]) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


def parse_pipeline(raw: Any, catalog: Catalog, input_names: set[str], prefix: str = "pipeline") -> Pipeline:
    """The pipeline, or VALIDATION_FAILED with one field error per problem."""
    try:
        pipeline = _ADAPTER.validate_python(raw)
    except ValidationError as exc:
        raise validation_failed(field_errors(exc, prefix)) from None
    errors: list[dict[str, str]] = []

    def err(where: str, message: str) -> None:
        errors.append({"field": f"{prefix}.{where}", "message": message})

    produced: set[str] = set()  # steps with one output, referenceable by $steps.<id>
    forks: set[str] = set()
    joined: set[str] = set()
    seen: set[str] = set()

    def check_op(where: str, vendor: str, operation: str, params: dict[str, Any]) -> OperationSpec | None:
        ops = catalog.get(vendor)
        if ops is None:
            err(f"{where}.vendor", f"unknown vendor {vendor!r} (known: {', '.join(sorted(catalog))})")
            return None
        spec = ops.get(operation)
        if spec is None:
            err(
                f"{where}.operation",
                f"{vendor} has no operation {operation!r} (has: {', '.join(sorted(ops))})",
            )
            return None
        try:
            spec.validate_params(params)
        except ValueError as exc:
            err(f"{where}.params", str(exc))
        return spec

    def check_call(where: str, step: CallStep) -> None:
        spec = check_op(where, step.vendor, step.operation, step.params)
        if spec is not None:
            expected = {i.name: i for i in spec.inputs}
            for name in sorted(set(expected) - set(step.inputs)):
                err(f"{where}.inputs.{name}", f"{step.operation} needs the image input {name!r}")
            for name in sorted(set(step.inputs) - set(expected)):
                err(f"{where}.inputs.{name}", f"{step.operation} has no input {name!r}")
        for name, value in step.inputs.items():
            for ref in _ref_names(value):
                kind, _, target = ref.partition(".")
                if kind == "$input":
                    if target not in input_names:
                        err(f"{where}.inputs.{name}", f"{ref}: the feature has no input {target!r}")
                elif kind == "$steps":
                    if target not in produced:
                        err(f"{where}.inputs.{name}", f"{ref}: must name an earlier call or join step")
                else:
                    err(f"{where}.inputs.{name}", f"{ref!r}: a reference is $input.<name> or $steps.<id>")

    def claim(where: str, step_id: str) -> None:
        if step_id in seen:
            err(f"{where}.id", f"step id {step_id!r} is used twice")
        seen.add(step_id)

    for i, step in enumerate(pipeline.steps):
        where = f"steps.{i}"
        claim(where, step.id)
        if isinstance(step, CallStep):
            check_call(where, step)
            produced.add(step.id)
        elif isinstance(step, ForkStep):
            for j, branch in enumerate(step.branches):
                claim(f"{where}.branches.{j}", branch.id)
                check_call(f"{where}.branches.{j}", branch)
            forks.add(step.id)
        else:
            if step.fork not in forks:
                err(f"{where}.fork", f"{step.fork!r} must name an earlier fork step")
            elif step.fork in joined:
                err(f"{where}.fork", f"fork {step.fork!r} is joined twice")
            joined.add(step.fork)
            if step.combiner is not None:
                c = step.combiner
                spec = check_op(f"{where}.combiner", c.vendor, c.operation, c.params)
                if spec is not None:
                    many = {i.name for i in spec.inputs if i.many}
                    if c.input not in many:
                        err(f"{where}.combiner.input", f"{c.operation} has no list input {c.input!r}")
                    elif len(spec.inputs) != 1:
                        err(
                            f"{where}.combiner.operation", f"{c.operation} needs more than the branch outputs"
                        )
            elif step.mode == "all":
                err(f"{where}.combiner", "joining all branches needs a combiner to make one output")
            produced.add(step.id)
    for fork in sorted(forks - joined):
        err("steps", f"fork {fork!r} is never joined")
    if pipeline.output not in produced:
        err("output", f"{pipeline.output!r} must name a call or join step")
    if errors:
        raise AppError(
            validation_failed(errors).code, "The pipeline is not valid", details={"fields": errors}
        )
    return pipeline
