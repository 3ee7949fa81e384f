-- AI features, uploaded and produced assets, tasks and their steps (issue 6).
CREATE TABLE features (
    id BIGINT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY,
    slug VARCHAR(64) NOT NULL,
    name VARCHAR(100) NOT NULL,
    description VARCHAR(1000) NOT NULL DEFAULT '',
    cost INT NOT NULL,
    inputs TEXT NOT NULL,
    pipeline TEXT NOT NULL,
    enabled TINYINT(1) NOT NULL DEFAULT 1,
    version INT UNSIGNED NOT NULL DEFAULT 1,
    created_at DATETIME(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
    updated_at DATETIME(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6) ON UPDATE CURRENT_TIMESTAMP(6),
    UNIQUE KEY uq_features_slug (slug),
    CONSTRAINT chk_features_cost CHECK (cost >= 0)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;

CREATE TABLE assets (
    id CHAR(24) NOT NULL PRIMARY KEY,
    user_id BIGINT UNSIGNED NOT NULL,
    kind VARCHAR(16) NOT NULL,
    task_id CHAR(24) NULL,
    storage_key VARCHAR(255) NOT NULL,
    content_type VARCHAR(32) NOT NULL,
    width INT UNSIGNED NOT NULL,
    height INT UNSIGNED NOT NULL,
    bytes INT UNSIGNED NOT NULL,
    created_at DATETIME(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
    KEY ix_assets_user (user_id, id),
    KEY ix_assets_task (task_id)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;

-- Ids are 24 hex characters: 12 of the creation time in ms, 12 random; they sort by age.
CREATE TABLE tasks (
    id CHAR(24) NOT NULL PRIMARY KEY,
    user_id BIGINT UNSIGNED NOT NULL,
    feature VARCHAR(64) NOT NULL,
    feature_version INT UNSIGNED NOT NULL,
    status VARCHAR(16) NOT NULL,
    progress DOUBLE NOT NULL DEFAULT 0,
    cost INT NOT NULL,
    inputs TEXT NOT NULL,
    idempotency_key VARCHAR(128) NOT NULL,
    request_hash CHAR(64) NOT NULL,
    attempts INT UNSIGNED NOT NULL DEFAULT 0,
    runner VARCHAR(128) NULL,
    error_code VARCHAR(32) NULL,
    error_message VARCHAR(500) NULL,
    created_at DATETIME(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
    updated_at DATETIME(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6) ON UPDATE CURRENT_TIMESTAMP(6),
    started_at DATETIME(6) NULL,
    finished_at DATETIME(6) NULL,
    UNIQUE KEY uq_tasks_idempotency (user_id, idempotency_key),
    KEY ix_tasks_user_status (user_id, status, id),
    KEY ix_tasks_status (status, updated_at)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;

-- One row per call step, fork branch and join of a task's pipeline run.
CREATE TABLE task_steps (
    id BIGINT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY,
    task_id CHAR(24) NOT NULL,
    step_id VARCHAR(64) NOT NULL,
    parent_id VARCHAR(64) NULL,
    vendor VARCHAR(32) NULL,
    operation VARCHAR(64) NULL,
    status VARCHAR(16) NOT NULL,
    attempt INT UNSIGNED NOT NULL DEFAULT 1,
    started_at DATETIME(6) NULL,
    finished_at DATETIME(6) NULL,
    error VARCHAR(500) NULL,
    UNIQUE KEY uq_task_steps (task_id, step_id)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;

INSERT INTO features (slug, name, description, cost, inputs, pipeline) VALUES
('tryon-preview', 'Virtual try-on preview',
 'Puts a garment on a person photo. The built-in local vendor pastes the cut-out garment on the torso (not AI).',
 10,
 '{"person": {"type": "image", "required": true}, "garment": {"type": "image", "required": true}}',
 '{"steps": [{"id": "cutout", "type": "call", "vendor": "local", "operation": "matting", "inputs": {"image": "$input.garment"}}, {"id": "compose", "type": "call", "vendor": "local", "operation": "tryon_compose", "inputs": {"person": "$input.person", "garment": "$steps.cutout"}}, {"id": "mark", "type": "call", "vendor": "local", "operation": "watermark", "inputs": {"image": "$steps.compose"}, "params": {"text": "preview"}}], "output": "mark"}'),
('bg-remove', 'Background removal',
 'Removes a plain backdrop (colour-key matting by the local vendor) and returns a transparent PNG.',
 2,
 '{"image": {"type": "image", "required": true}}',
 '{"steps": [{"id": "matte", "type": "call", "vendor": "local", "operation": "matting", "inputs": {"image": "$input.image"}}], "output": "matte"}'),
('multi-style', 'Four styles',
 'Renders the photo in four styles in parallel and joins them into one 2x2 sheet.',
 8,
 '{"image": {"type": "image", "required": true}}',
 '{"steps": [{"id": "styles", "type": "fork", "branches": [{"id": "mono", "type": "call", "vendor": "local", "operation": "style", "inputs": {"image": "$input.image"}, "params": {"filter": "mono"}}, {"id": "warm", "type": "call", "vendor": "local", "operation": "style", "inputs": {"image": "$input.image"}, "params": {"filter": "warm"}}, {"id": "cool", "type": "call", "vendor": "local", "operation": "style", "inputs": {"image": "$input.image"}, "params": {"filter": "cool"}}, {"id": "sketch", "type": "call", "vendor": "local", "operation": "style", "inputs": {"image": "$input.image"}, "params": {"filter": "sketch"}}]}, {"id": "sheet", "type": "join", "fork": "styles", "mode": "all", "combiner": {"vendor": "local", "operation": "grid", "input": "images"}}], "output": "sheet"}');
