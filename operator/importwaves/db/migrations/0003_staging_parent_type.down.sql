ALTER TABLE staging_records DROP COLUMN IF EXISTS parent_record_type_id;
