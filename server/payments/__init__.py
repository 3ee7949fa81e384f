"""Products, orders and payments (issue 12); docs/payments.md tells the design.

`facade.py` is the entry point (`Payments`, built by `open_payments`); `orders.py` and
`refunds.py` own the order and refund state machines; `wechat.py` and `alipay.py` are the
provider adapters behind `providers.Provider`.
"""
