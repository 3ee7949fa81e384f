"""Retention classes by key prefix, and the COS lifecycle rules that enforce them.

- `upload`: `u/{user}/{asset id}.{ext}`; kept until the user deletes the asset.
- `output`: `o/{user}/{asset id}.{ext}`; kept OUTPUT_RETENTION_DAYS unless the user keeps it.
- `temporary`: `vendor-inputs/…` (inputs published for remote vendors) and `tmp/…`
  (intermediate step results); kept 1 day, longer if VENDOR_INPUT_URL_TTL + 1 h is.

Outputs written before this split live under `u/` too; for those the `assets` row's
`kind` decides (the nightly job expires rows by kind, not by key). Keeping an output
(`keep`) copies its bytes to `u/…` and points the row there, so the `o/` lifecycle rule
never reaches a kept output. Anything else in the bucket is class `other`.

On COS, `lifecycle_rules` become the bucket's lifecycle configuration (`python run.py
storage lifecycle --apply`); the nightly job (server/media/orphans.py) applies the same
rules on every backend, so a local install behaves like production.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Final

from server.config import Settings
from server.media.storage import Storage
from server.vendors.facade import INPUT_PREFIX

UPLOAD: Final = "upload"
OUTPUT: Final = "output"
TEMPORARY: Final = "temporary"
OTHER: Final = "other"
CLASSES: Final = (UPLOAD, OUTPUT, TEMPORARY, OTHER)

UPLOAD_PREFIX: Final = "u/"
OUTPUT_PREFIX: Final = "o/"
VENDOR_INPUT_PREFIX: Final = f"{INPUT_PREFIX}/"
TMP_PREFIX: Final = "tmp/"  # intermediate step results (reserved: none are written today)
TEMPORARY_PREFIXES: Final = (VENDOR_INPUT_PREFIX, TMP_PREFIX)
VENDOR_INPUT_MARGIN_S: Final = 3600  # a vendor input outlives its signed URL by this much
RULE_ID_PREFIX: Final = "wardrobe-"  # lifecycle rules with other ids belong to someone else
DAY: Final = 86_400


def class_of_key(key: str) -> str:
    if key.startswith(UPLOAD_PREFIX):
        return UPLOAD
    if key.startswith(OUTPUT_PREFIX):
        return OUTPUT
    if key.startswith(TEMPORARY_PREFIXES):
        return TEMPORARY
    return OTHER


def class_of_row(kind: str, kept: bool) -> str:
    """An asset row's class: an output nobody kept expires; anything else is the user's."""
    return OUTPUT if kind == "output" and not kept else UPLOAD


def prefix_for(kind: str) -> str:
    """Where new objects of an asset kind go."""
    return OUTPUT_PREFIX if kind == "output" else UPLOAD_PREFIX


def temporary_days(settings: Settings) -> int:
    """1, or more when a vendor input's signed URL (plus a margin) outlives a day."""
    return max(1, math.ceil((settings.vendor.input_url_ttl + VENDOR_INPUT_MARGIN_S) / DAY))


@dataclass(frozen=True, slots=True, order=True)
class Rule:
    id: str
    prefix: str
    days: int

    def to_cos(self) -> dict[str, Any]:
        """The dict `put_bucket_lifecycle` turns into one `<Rule>`."""
        return {
            "ID": self.id,
            "Filter": {"Prefix": self.prefix},
            "Status": "Enabled",
            "Expiration": {"Days": str(self.days)},
        }


def lifecycle_rules(settings: Settings) -> list[Rule]:
    """The rules the bucket must have. Outputs expire a day after the nightly job removes
    their rows (it deletes the bytes then too), so the bucket rule is only a backstop and
    never takes an object whose row is still served."""
    temp = temporary_days(settings)
    return [
        Rule(f"{RULE_ID_PREFIX}outputs", OUTPUT_PREFIX, settings.storage.output_retention_days + 1),
        Rule(f"{RULE_ID_PREFIX}vendor-inputs", VENDOR_INPUT_PREFIX, temp),
        Rule(f"{RULE_ID_PREFIX}tmp", TMP_PREFIX, temp),
    ]


def rule_from_cos(raw: dict[str, Any]) -> Rule | None:
    """One rule as `get_bucket_lifecycle` parses it, or None when it is not a plain
    enabled prefix expiration (then it cannot equal one of ours)."""
    if raw.get("Status") != "Enabled":
        return None
    flt = raw.get("Filter")
    prefix = flt.get("Prefix") if isinstance(flt, dict) else raw.get("Prefix")
    expiration = raw.get("Expiration")
    days = expiration.get("Days") if isinstance(expiration, dict) else None
    if not isinstance(prefix, str) or not str(days or "").isdigit():
        return None
    return Rule(str(raw.get("ID") or ""), prefix, int(str(days)))


def lifecycle_differences(wanted: list[Rule], current: list[dict[str, Any]]) -> list[str]:
    """What differs between our rules and the bucket's, one line each ([] when they match).
    Rules whose ID does not start with `wardrobe-` are someone else's and are ignored."""
    ours = {str(r.get("ID") or ""): r for r in current if str(r.get("ID") or "").startswith(RULE_ID_PREFIX)}
    lines = []
    for rule in wanted:
        raw = ours.pop(rule.id, None)
        if raw is None:
            lines.append(f"missing: {rule.id} ({rule.prefix} after {rule.days} day(s))")
        elif (have := rule_from_cos(raw)) != rule:
            shown = f"{have.prefix} after {have.days} day(s)" if have else "not a plain enabled expiration"
            lines.append(
                f"differs: {rule.id}: bucket has {shown}, want {rule.prefix} after {rule.days} day(s)"
            )
    lines.extend(f"unexpected: {rule_id} (not in the configuration)" for rule_id in sorted(ours))
    return lines


async def lifecycle_check(storage: Storage, settings: Settings) -> list[str] | None:
    """The bucket's rules against ours (`lifecycle_differences`; [] when they match), or
    None for a backend with no bucket rules (local: the nightly job applies them)."""
    get_lifecycle = getattr(storage, "get_lifecycle", None)
    if get_lifecycle is None:
        return None
    current: list[dict[str, Any]] = await get_lifecycle()
    return lifecycle_differences(lifecycle_rules(settings), current)


def merged_configuration(wanted: list[Rule], current: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rules to put: ours, then every rule of someone else's unchanged."""
    foreign = [r for r in current if not str(r.get("ID") or "").startswith(RULE_ID_PREFIX)]
    return [rule.to_cos() for rule in wanted] + foreign
