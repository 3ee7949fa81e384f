-- Retention classes (issue 14): a task output is kept OUTPUT_RETENTION_DAYS unless the
-- user saves it (`kept_at`); the nightly job finds expired outputs through ix_assets_expiry.
ALTER TABLE assets
    ADD COLUMN kept_at DATETIME(6) NULL AFTER bytes,
    ADD KEY ix_assets_expiry (kind, kept_at, created_at);
