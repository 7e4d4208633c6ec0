-- Back to 0001's counter trigger functions (batch counters only).
CREATE OR REPLACE FUNCTION wave_batches_count_insert() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM wave_counts_apply(array_agg(job_id), array_agg(wave_number), array_agg(status),
                              array_agg(1), array_agg(completed_at))
    FROM new_rows;
    RETURN NULL;
END
$$;

CREATE OR REPLACE FUNCTION wave_batches_count_delete() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM wave_counts_apply(array_agg(job_id), array_agg(wave_number), array_agg(status),
                              array_agg(-1), array_agg(completed_at))
    FROM old_rows;
    RETURN NULL;
END
$$;

CREATE OR REPLACE FUNCTION wave_batches_count_update() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM wave_counts_apply(array_agg(c.job_id), array_agg(c.wave_number),
                              array_agg(c.status), array_agg(c.sign), array_agg(c.done))
    FROM (
        SELECT n.job_id, n.wave_number, n.status, 1 AS sign, n.completed_at AS done
        FROM new_rows n JOIN old_rows o ON o.id = n.id
        WHERE n.status IS DISTINCT FROM o.status
        UNION ALL
        SELECT o.job_id, o.wave_number, o.status, -1, NULL
        FROM new_rows n JOIN old_rows o ON o.id = n.id
        WHERE n.status IS DISTINCT FROM o.status
    ) c
    HAVING count(*) > 0;
    RETURN NULL;
END
$$;

DROP FUNCTION IF EXISTS wave_counts_rows_apply(
    text[], integer[], text[], integer[], timestamptz[], bigint[], bigint[]);
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
