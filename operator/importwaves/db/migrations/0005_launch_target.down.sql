DROP INDEX IF EXISTS wave_batches_claimable;
ALTER TABLE import_jobs DROP COLUMN IF EXISTS launch_target;
