-- Products, orders and payments (issue 12). Money is integer fen.
CREATE TABLE products (
    id VARCHAR(32) NOT NULL PRIMARY KEY,
    kind VARCHAR(16) NOT NULL,
    name VARCHAR(100) NOT NULL,
    price_fen INT NOT NULL,
    credits INT NOT NULL DEFAULT 0,
    membership_days INT NOT NULL DEFAULT 0,
    enabled TINYINT(1) NOT NULL DEFAULT 1,
    created_at DATETIME(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
    updated_at DATETIME(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6) ON UPDATE CURRENT_TIMESTAMP(6),
    CONSTRAINT chk_products_price CHECK (price_fen > 0),
    CONSTRAINT chk_products_credits CHECK (credits >= 0 AND membership_days >= 0)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;

INSERT INTO products (id, kind, name, price_fen, credits, membership_days) VALUES
('credits-100', 'credits', '100 credits', 990, 100, 0),
('credits-500', 'credits', '500 credits', 3990, 500, 0),
('member-month', 'membership', 'Member, one month', 2990, 300, 30);

-- One row per order. The product's terms are copied in: a later price change never
-- changes what an order costs or gives. status: pending -> paid -> partially_refunded
-- -> refunded; pending -> closed (-> paid when the money arrives anyway).
CREATE TABLE orders (
    order_no VARCHAR(32) CHARACTER SET ascii COLLATE ascii_bin NOT NULL PRIMARY KEY,
    user_id BIGINT UNSIGNED NOT NULL,
    product_id VARCHAR(32) NOT NULL,
    product_kind VARCHAR(16) NOT NULL,
    credits INT NOT NULL,
    membership_days INT NOT NULL,
    channel VARCHAR(32) NOT NULL,
    amount_fen INT NOT NULL,
    status VARCHAR(24) NOT NULL,
    pay_params TEXT NULL,
    idempotency_key VARCHAR(128) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    request_hash CHAR(64) NOT NULL,
    provider_txn_id VARCHAR(64) NULL,
    paid_source VARCHAR(16) NULL,
    refunded_fen INT NOT NULL DEFAULT 0,
    created_at DATETIME(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
    expires_at DATETIME(6) NOT NULL,
    paid_at DATETIME(6) NULL,
    closed_at DATETIME(6) NULL,
    updated_at DATETIME(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6) ON UPDATE CURRENT_TIMESTAMP(6),
    UNIQUE KEY uq_orders_idempotency (user_id, idempotency_key),
    KEY ix_orders_user (user_id, created_at, order_no),
    KEY ix_orders_status (status, created_at),
    CONSTRAINT chk_orders_amount CHECK (amount_fen > 0 AND refunded_fen >= 0 AND refunded_fen <= amount_fen)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;

-- Every notification received, verified or not, and what became of it:
-- outcome applied | duplicate | refused | error; reason says why it was refused.
CREATE TABLE payment_notifications (
    id BIGINT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY,
    provider VARCHAR(16) NOT NULL,
    kind VARCHAR(16) NOT NULL,
    event_id VARCHAR(64) NULL,
    order_no VARCHAR(64) NULL,
    verified TINYINT(1) NOT NULL,
    outcome VARCHAR(16) NOT NULL,
    reason VARCHAR(200) NULL,
    body MEDIUMTEXT NOT NULL,
    remote VARCHAR(64) NULL,
    created_at DATETIME(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
    KEY ix_payment_notifications_order (order_no, id),
    KEY ix_payment_notifications_created (created_at)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;

-- Refunds (filled by the refunds part of issue 12): processing -> succeeded | failed.
CREATE TABLE refunds (
    refund_no VARCHAR(32) CHARACTER SET ascii COLLATE ascii_bin NOT NULL PRIMARY KEY,
    order_no VARCHAR(32) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    user_id BIGINT UNSIGNED NOT NULL,
    amount_fen INT NOT NULL,
    status VARCHAR(16) NOT NULL,
    reason VARCHAR(200) NOT NULL,
    idempotency_key VARCHAR(128) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    request_hash CHAR(64) NOT NULL,
    provider_refund_id VARCHAR(64) NULL,
    clawback_credits INT NOT NULL DEFAULT 0,
    clawback_shortfall INT NOT NULL DEFAULT 0,
    created_by BIGINT UNSIGNED NULL,
    created_at DATETIME(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
    finished_at DATETIME(6) NULL,
    UNIQUE KEY uq_refunds_idempotency (order_no, idempotency_key),
    KEY ix_refunds_order (order_no),
    KEY ix_refunds_status (status, created_at),
    CONSTRAINT chk_refunds_amount CHECK (amount_fen > 0)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;

-- Distributor commissions (issue 13 fills them in): one per paid order at most.
-- status: pending -> settled | reversed.
CREATE TABLE commissions (
    id BIGINT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY,
    order_no VARCHAR(32) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    distributor_id BIGINT UNSIGNED NOT NULL,
    buyer_id BIGINT UNSIGNED NOT NULL,
    amount_fen INT NOT NULL,
    status VARCHAR(16) NOT NULL,
    settles_at DATETIME(6) NOT NULL,
    created_at DATETIME(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
    updated_at DATETIME(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6) ON UPDATE CURRENT_TIMESTAMP(6),
    UNIQUE KEY uq_commissions_order (order_no),
    KEY ix_commissions_distributor (distributor_id, id),
    KEY ix_commissions_due (status, settles_at)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;

-- Memberships: the tier and when it ends (NULL: never a member).
ALTER TABLE users
    ADD COLUMN membership_tier VARCHAR(16) NULL,
    ADD COLUMN membership_expires_at DATETIME(6) NULL;
