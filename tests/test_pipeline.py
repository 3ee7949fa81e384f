"""Pipeline definitions are checked when saved, with one field error per problem."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from server.errors import AppError, ErrorCode
from server.tasks.pipeline import parse_pipeline
from server.vendors import local

CATALOG = {"local": local.OPERATIONS}
ROOT = Path(__file__).resolve().parent.parent


def errors_of(raw: Any, inputs: set[str] | None = None) -> dict[str, str]:
    with pytest.raises(AppError) as err:
        parse_pipeline(raw, CATALOG, inputs or {"image"})
    assert err.value.code == ErrorCode.VALIDATION_FAILED
    return {f["field"]: f["message"] for f in err.value.details["fields"]}


def call(step_id: str, ref: str = "$input.image", op: str = "matting", **params: Any) -> dict[str, Any]:
    return {
        "id": step_id,
        "type": "call",
        "vendor": "local",
        "operation": op,
        "inputs": {"image": ref},
        "params": params,
    }


def test_the_seeded_features_are_valid() -> None:
    sql = (ROOT / "sql" / "0004_features_tasks.sql").read_text()
    seeds = re.findall(r"\('([a-z-]+)',.*?'(\{.*?\})',\s*'(\{.*?\})'\)", sql, re.S)
    assert [s[0] for s in seeds] == ["tryon-preview", "bg-remove", "multi-style"]
    for _slug, inputs, pipeline in seeds:
        parsed = parse_pipeline(json.loads(pipeline), CATALOG, set(json.loads(inputs)))
        assert parsed.steps


def test_a_reference_to_a_later_step_is_refused_so_no_cycle_can_be_written() -> None:
    errs = errors_of({"steps": [call("a", "$steps.b"), call("b", "$steps.a")], "output": "b"})
    assert errs == {"pipeline.steps.0.inputs.image": "$steps.b: must name an earlier call or join step"}


def test_unknown_vendor_operation_input_and_param_are_each_named() -> None:
    errs = errors_of(
        {
            "steps": [
                {"id": "a", "type": "call", "vendor": "nope", "operation": "x", "inputs": {}},
                call("b", op="teleport"),
                call("c", "$input.missing"),
                call("d", op="style", filter="neon"),
            ],
            "output": "d",
        }
    )
    assert set(errs) == {
        "pipeline.steps.0.vendor",
        "pipeline.steps.1.operation",
        "pipeline.steps.2.inputs.image",
        "pipeline.steps.3.params",
    }
    assert "neon" in errs["pipeline.steps.3.params"]


def test_a_fork_must_be_joined_and_joining_all_needs_a_combiner() -> None:
    fork = {
        "id": "f",
        "type": "fork",
        "branches": [call("x", op="style", filter="mono"), call("y", op="style", filter="warm")],
    }
    errs = errors_of({"steps": [fork], "output": "x"})
    assert errs["pipeline.steps"] == "fork 'f' is never joined"
    assert "pipeline.output" in errs
    errs = errors_of(
        {"steps": [fork, {"id": "j", "type": "join", "fork": "f", "mode": "all"}], "output": "j"}
    )
    assert errs == {"pipeline.steps.1.combiner": "joining all branches needs a combiner to make one output"}


def test_a_first_success_join_needs_no_combiner() -> None:
    fork = {"id": "f", "type": "fork", "branches": [call("x"), call("y")]}
    p = parse_pipeline(
        {"steps": [fork, {"id": "j", "type": "join", "fork": "f", "mode": "first_success"}], "output": "j"},
        CATALOG,
        {"image"},
    )
    assert p.call_count() == 2


def test_duplicate_ids_and_malformed_steps_are_refused() -> None:
    errs = errors_of({"steps": [call("a"), call("a")], "output": "a"})
    assert errs == {"pipeline.steps.1.id": "step id 'a' is used twice"}
    errs = errors_of({"steps": [{"id": "Bad Id", "type": "call"}], "output": "x"})
    assert any(k.startswith("pipeline.steps.0") for k in errs)
