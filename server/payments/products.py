"""Products: what can be bought (a credit pack or a membership) and at what price."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from server.db import Database, Row, is_duplicate
from server.errors import Conflict, NotFound, validation_failed

Kind = Literal["credits", "membership"]
COLUMNS = "id, kind, name, price_fen, credits, membership_days, enabled"


@dataclass(frozen=True, slots=True)
class Product:
    id: str
    kind: Kind
    name: str
    price_fen: int
    credits: int
    membership_days: int
    enabled: bool

    @classmethod
    def of(cls, row: Row) -> Product:
        return cls(
            id=str(row["id"]),
            kind=row["kind"],
            name=str(row["name"]),
            price_fen=int(row["price_fen"]),
            credits=int(row["credits"]),
            membership_days=int(row["membership_days"]),
            enabled=bool(row["enabled"]),
        )

    def public(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "kind": self.kind,
            "name": self.name,
            "price_fen": self.price_fen,
            "credits": self.credits,
            "membership_days": self.membership_days,
            "enabled": self.enabled,
        }


def check_terms(kind: str, credits: int, membership_days: int) -> None:
    if kind == "membership" and membership_days <= 0:
        raise validation_failed(
            [{"field": "membership_days", "message": "a membership lasts at least a day"}]
        )
    if kind == "credits" and (credits <= 0 or membership_days != 0):
        raise validation_failed(
            [{"field": "credits", "message": "a credit pack grants credits and no membership days"}]
        )


class Products:
    """The products table, with an in-process cache used only to ACCEPT an order.

    `for_sale()` answers a cached, enabled product as is and reads MySQL on a miss or a
    cached-disabled product, so a refusal ("no such product", "not on sale") is always
    current and a product enabled on another instance is seen at once. A cached product
    whose terms changed elsewhere (another instance's admin) is caught where it matters:
    the order's INSERT re-checks the terms against the row (Payments.create_order), and on
    a mismatch the caller reads it again. Every read here (`get`, `list`) replaces or
    drops the cached entry; admin create/update on this instance replace it too."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self._cache: dict[str, Product] = {}  # bounded by the products table: misses are not cached

    def _keep(self, product: Product) -> Product:
        self._cache[product.id] = product
        return product

    async def for_sale(self, product_id: str) -> Product | None:
        """The product to accept an order for: the cached one when it is enabled, else MySQL's."""
        cached = self._cache.get(product_id)
        if cached is not None and cached.enabled:
            return cached
        return await self.get(product_id)

    async def list(self, *, enabled_only: bool) -> list[Product]:
        where = " WHERE enabled = 1" if enabled_only else ""
        rows = await self.db.fetchall(f"SELECT {COLUMNS} FROM products{where} ORDER BY price_fen, id")
        return [self._keep(Product.of(r)) for r in rows]

    async def get(self, product_id: str) -> Product | None:
        """The product as MySQL has it now."""
        row = await self.db.fetchone(f"SELECT {COLUMNS} FROM products WHERE id = %s", product_id)
        if row is None:
            self._cache.pop(product_id, None)
            return None
        return self._keep(Product.of(row))

    async def create(self, values: dict[str, Any]) -> Product:
        check_terms(values["kind"], values["credits"], values["membership_days"])
        cols = ", ".join(values)
        marks = ", ".join(["%s"] * len(values))
        try:
            await self.db.execute(f"INSERT INTO products ({cols}) VALUES ({marks})", *values.values())
        except Exception as exc:
            if is_duplicate(exc):
                raise Conflict(f"product {values['id']} exists") from None
            raise
        product = await self.get(values["id"])
        assert product is not None
        return product

    async def update(self, product_id: str, changes: dict[str, Any]) -> Product:
        current = await self.get(product_id)
        if current is None:
            raise NotFound(f"No product {product_id}")
        merged = {**current.public(), **changes}
        check_terms(merged["kind"], merged["credits"], merged["membership_days"])
        if changes:
            sets = ", ".join(f"{col} = %s" for col in changes)
            await self.db.execute(f"UPDATE products SET {sets} WHERE id = %s", *changes.values(), product_id)
        product = await self.get(product_id)
        assert product is not None
        return product
