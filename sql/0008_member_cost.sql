-- Issue 12: a feature may cost members less. NULL: members pay `cost` like everyone.
ALTER TABLE features
    ADD COLUMN member_cost INT NULL AFTER cost,
    ADD CONSTRAINT chk_features_member_cost CHECK (member_cost IS NULL OR member_cost >= 0);
