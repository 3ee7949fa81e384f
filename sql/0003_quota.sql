-- Credits (issue 5). Each user's balance and reserved amount live in one row that
-- every change locks (SELECT ... FOR UPDATE); available = balance - reserved.
CREATE TABLE quota_accounts (
    user_id BIGINT UNSIGNED NOT NULL PRIMARY KEY,
    balance BIGINT NOT NULL DEFAULT 0,
    reserved BIGINT NOT NULL DEFAULT 0,
    version BIGINT UNSIGNED NOT NULL DEFAULT 0,
    updated_at DATETIME(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6) ON UPDATE CURRENT_TIMESTAMP(6),
    CONSTRAINT chk_quota_accounts_nonneg CHECK (reserved >= 0 AND balance >= reserved)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;

-- One reservation per task: reserved -> confirmed | cancelled, never both.
CREATE TABLE quota_transactions (
    id BIGINT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY,
    task_id VARCHAR(64) NOT NULL,
    user_id BIGINT UNSIGNED NOT NULL,
    amount BIGINT NOT NULL,
    phase VARCHAR(16) NOT NULL,
    reason VARCHAR(200) NULL,
    expires_at DATETIME(6) NOT NULL,
    created_at DATETIME(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
    settled_at DATETIME(6) NULL,
    UNIQUE KEY uq_quota_transactions_task (task_id),
    KEY ix_quota_transactions_sweep (phase, expires_at),
    KEY ix_quota_transactions_user (user_id, phase),
    CONSTRAINT chk_quota_transactions_amount CHECK (amount > 0)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;

-- Append-only. balance = SUM(balance_delta), reserved = SUM(reserved_delta) per user.
-- `ref` makes a grant idempotent (an order number applied once).
CREATE TABLE quota_ledger (
    id BIGINT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY,
    user_id BIGINT UNSIGNED NOT NULL,
    kind VARCHAR(16) NOT NULL,
    balance_delta BIGINT NOT NULL,
    reserved_delta BIGINT NOT NULL,
    balance_after BIGINT NOT NULL,
    reserved_after BIGINT NOT NULL,
    task_id VARCHAR(64) NULL,
    order_no VARCHAR(64) NULL,
    ref VARCHAR(128) NULL,
    reason VARCHAR(200) NULL,
    created_at DATETIME(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
    KEY ix_quota_ledger_user (user_id, id),
    KEY ix_quota_ledger_task (task_id),
    UNIQUE KEY uq_quota_ledger_ref (kind, ref)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;
