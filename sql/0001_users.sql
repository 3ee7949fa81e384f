-- Accounts. Credits live in their own tables (a later migration); a user row is
-- read on every profile request and changed rarely.
CREATE TABLE users (
    id BIGINT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY,
    phone VARCHAR(20) NULL,
    password_hash VARCHAR(255) NULL,
    wechat_openid VARCHAR(64) NULL,
    wechat_unionid VARCHAR(64) NULL,
    nickname VARCHAR(40) NULL,
    avatar_url VARCHAR(1024) NULL,
    gender VARCHAR(8) NOT NULL DEFAULT 'unknown',
    role VARCHAR(16) NOT NULL DEFAULT 'user',
    status VARCHAR(16) NOT NULL DEFAULT 'active',
    invite_code VARCHAR(16) NULL,
    referrer_id BIGINT UNSIGNED NULL,
    created_at DATETIME(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
    updated_at DATETIME(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6) ON UPDATE CURRENT_TIMESTAMP(6),
    UNIQUE KEY uq_users_phone (phone),
    UNIQUE KEY uq_users_wechat_openid (wechat_openid),
    UNIQUE KEY uq_users_invite_code (invite_code),
    KEY ix_users_referrer (referrer_id),
    KEY ix_users_created (created_at)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;
