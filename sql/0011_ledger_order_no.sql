-- The ledger's order number in the orders table's type (ascii_bin, 32), with an index:
-- `run.py check-orders` joins the two both ways; with different collations no index could
-- serve the join and 12,000 paid orders took over a minute (bench/RESULTS.md "Payments").
ALTER TABLE quota_ledger
    MODIFY order_no VARCHAR(32) CHARACTER SET ascii COLLATE ascii_bin NULL,
    ADD KEY ix_quota_ledger_order (order_no);
