-- Idempotency keys are opaque: compare them byte for byte. Under the table's
-- utf8mb4_unicode_ci, "A1" and "a1" (or "e" and "é") were one key, so a client's second
-- task could be answered with its first one, or refused as IDEMPOTENCY_CONFLICT.
ALTER TABLE tasks
    MODIFY idempotency_key VARCHAR(128) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL;
