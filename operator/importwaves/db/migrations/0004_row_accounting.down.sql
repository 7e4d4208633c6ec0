DROP TRIGGER IF EXISTS wave_batches_rows_update ON wave_batches;
DROP TRIGGER IF EXISTS wave_batches_rows_delete ON wave_batches;
DROP TRIGGER IF EXISTS wave_batches_rows_insert ON wave_batches;
DROP FUNCTION IF EXISTS wave_batches_rows_update();
DROP FUNCTION IF EXISTS wave_batches_rows_delete();
DROP FUNCTION IF EXISTS wave_batches_rows_insert();
DROP FUNCTION IF EXISTS wave_rows_apply(text[], integer[], bigint[], bigint[]);
ALTER TABLE wave_batches DROP CONSTRAINT IF EXISTS wave_batches_completed_rows_written;
ALTER TABLE wave_batches DROP COLUMN IF EXISTS rows_written;
ALTER TABLE wave_coordination DROP COLUMN IF EXISTS rows_written;
ALTER TABLE wave_coordination DROP COLUMN IF EXISTS rows_planned;
ALTER TABLE wave_coordination DROP COLUMN IF EXISTS rows_skipped;
ALTER TABLE wave_coordination DROP COLUMN IF EXISTS rows_staged;
ALTER TABLE import_jobs DROP COLUMN IF EXISTS staging_report;
ALTER TABLE import_jobs DROP COLUMN IF EXISTS status_code;
-- Jobs left `invalid` go back to `running` (0003's engine re-plans them: its own behaviour).
UPDATE import_jobs SET status = 'running' WHERE status = 'invalid';
ALTER TABLE import_jobs DROP CONSTRAINT import_jobs_status_check;
ALTER TABLE import_jobs ADD CONSTRAINT import_jobs_status_check
    CHECK (status IN ('running', 'completed', 'failed', 'suspended'));
