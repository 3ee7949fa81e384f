-- Distributors with encrypted identity data, the audit log, admin permissions (issue 13).

-- One row per user who applied. status: pending -> approved | rejected
-- (server/distributors/states.py). The real name and ID number are stored only sealed
-- (server/pii/envelope.py): *_ct is nonce + AES-256-GCM ciphertext + tag under the row's
-- own data key; data_key is that key wrapped by the KMS under kek_version. id_card_bidx
-- is HMAC-SHA256 of the normalised number (the blind index): duplicates are found by it.
-- Deleting the identity (crypto-shredding) clears data_key and the index.
CREATE TABLE distributors (
    user_id BIGINT UNSIGNED NOT NULL PRIMARY KEY,
    status VARCHAR(16) NOT NULL,
    real_name_ct VARBINARY(512) NULL,
    id_card_ct VARBINARY(512) NULL,
    data_key VARBINARY(1024) NULL,
    kek_version VARCHAR(128) CHARACTER SET ascii COLLATE ascii_bin NULL,
    id_card_bidx BINARY(32) NULL,
    real_name_masked VARCHAR(64) NOT NULL,
    id_card_masked VARCHAR(32) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    commission_rate DECIMAL(6, 4) NULL,
    decided_by BIGINT UNSIGNED NULL,
    decided_at DATETIME(6) NULL,
    decision_reason VARCHAR(255) NULL,
    identity_deleted_at DATETIME(6) NULL,
    created_at DATETIME(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
    updated_at DATETIME(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6) ON UPDATE CURRENT_TIMESTAMP(6),
    UNIQUE KEY uq_distributors_bidx (id_card_bidx),
    KEY ix_distributors_status (status, user_id),
    KEY ix_distributors_kek (kek_version, user_id)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;

-- Who did what to whose personal data, allowed or refused. Append-only: no code path
-- updates or deletes a row.
CREATE TABLE audit_log (
    id BIGINT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY,
    actor_id BIGINT UNSIGNED NULL,
    action VARCHAR(64) NOT NULL,
    subject_user_id BIGINT UNSIGNED NULL,
    reason VARCHAR(255) NULL,
    request_id VARCHAR(64) NULL,
    ip VARCHAR(64) NULL,
    allowed TINYINT(1) NOT NULL,
    created_at DATETIME(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
    KEY ix_audit_subject (subject_user_id, id),
    KEY ix_audit_actor (actor_id, id)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;

-- Permissions of an admin (comma separated, e.g. "pii:read"); they travel in the access
-- token's `perms` claim.
ALTER TABLE users ADD COLUMN permissions VARCHAR(255) NOT NULL DEFAULT '';

-- Commissions: the rate they were earned at, and negative adjustments (a refund after
-- settlement) as rows of kind 'adjustment' named by the refund (ref); the commission
-- itself has ref ''.
ALTER TABLE commissions
    ADD COLUMN kind VARCHAR(16) NOT NULL DEFAULT 'commission',
    ADD COLUMN ref VARCHAR(40) CHARACTER SET ascii COLLATE ascii_bin NOT NULL DEFAULT '',
    ADD COLUMN rate DECIMAL(6, 4) NOT NULL DEFAULT 0,
    ADD COLUMN order_fen INT NOT NULL DEFAULT 0,
    ADD COLUMN settled_at DATETIME(6) NULL,
    DROP INDEX uq_commissions_order,
    ADD UNIQUE KEY uq_commissions_order_ref (order_no, ref);
