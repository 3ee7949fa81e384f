-- Accounts and authentication (issue 4).
-- A session is one login (a family of refresh tokens). It lives in Redis; this row is its
-- audit record and the truth for revocation (logout-everywhere, password reset, ban).
CREATE TABLE auth_sessions (
    id CHAR(32) NOT NULL PRIMARY KEY,
    user_id BIGINT UNSIGNED NOT NULL,
    method VARCHAR(16) NOT NULL,
    ip VARCHAR(45) NULL,
    user_agent VARCHAR(255) NULL,
    rotations INT UNSIGNED NOT NULL DEFAULT 0,
    created_at DATETIME(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
    last_refreshed_at DATETIME(6) NULL,
    expires_at DATETIME(6) NOT NULL,
    revoked_at DATETIME(6) NULL,
    revoke_reason VARCHAR(32) NULL,
    KEY ix_auth_sessions_user (user_id, revoked_at),
    KEY ix_auth_sessions_created (created_at)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;

ALTER TABLE users
    ADD COLUMN password_changed_at DATETIME(6) NULL,
    ADD COLUMN banned_at DATETIME(6) NULL,
    ADD COLUMN ban_reason VARCHAR(255) NULL,
    ADD KEY ix_users_wechat_unionid (wechat_unionid),
    ADD KEY ix_users_nickname (nickname);
