-- Data-level completion: row counts next to batch counts.
--
-- wave_coordination.rows_staged / rows_skipped are written at planning (staging rows of the
-- wave's record type; rows no batch can cover that spec.uncoveredRows=Skip skipped);
-- rows_planned / rows_written are kept by the statement-level triggers below in the same
-- transaction as every batch change, like the batch counters (rows_planned = sum of the batches'
-- record_count, rows_written = sum of their rows_written).
-- wave_batches.rows_written is the row count the completing worker recorded in its own fenced
-- transaction; a batch cannot be completed without it (CHECK below, NOT VALID: batches completed
-- before this migration keep NULL and are reported by the completion check, never trusted).
-- import_jobs gets the status `invalid` (planning refused: no staging rows, or rows no batch can
-- cover), a machine-readable status_code (NoStagingRecords, UncoveredStagingRows,
-- RowCountMismatch, ...) and the planning's staging report (per type staged / uncovered, first
-- ids), so a status can show it even when no wave exists.

ALTER TABLE import_jobs DROP CONSTRAINT import_jobs_status_check;
ALTER TABLE import_jobs ADD CONSTRAINT import_jobs_status_check
    CHECK (status IN ('running', 'completed', 'failed', 'suspended', 'invalid'));
ALTER TABLE import_jobs ADD COLUMN status_code text NOT NULL DEFAULT '';
ALTER TABLE import_jobs ADD COLUMN staging_report jsonb;

ALTER TABLE wave_coordination ADD COLUMN rows_staged bigint NOT NULL DEFAULT 0;
ALTER TABLE wave_coordination ADD COLUMN rows_skipped bigint NOT NULL DEFAULT 0;
ALTER TABLE wave_coordination ADD COLUMN rows_planned bigint NOT NULL DEFAULT 0;
ALTER TABLE wave_coordination ADD COLUMN rows_written bigint NOT NULL DEFAULT 0;

ALTER TABLE wave_batches ADD COLUMN rows_written integer;
ALTER TABLE wave_batches ADD CONSTRAINT wave_batches_completed_rows_written
    CHECK (status <> 'completed' OR rows_written IS NOT NULL) NOT VALID;

-- Existing waves: planned rows from their batches (rows_written stays 0: no batch has a count).
UPDATE wave_coordination w SET rows_planned = b.n
FROM (SELECT job_id, wave_number, sum(record_count)::bigint AS n FROM wave_batches
      GROUP BY job_id, wave_number) b
WHERE w.job_id = b.job_id AND w.wave_number = b.wave_number;

CREATE FUNCTION wave_rows_apply(
    job_ids text[], waves integer[], planned bigint[], written bigint[]
) RETURNS void LANGUAGE sql AS $$
    UPDATE wave_coordination w SET
        rows_planned = w.rows_planned + d.planned,
        rows_written = w.rows_written + d.written,
        updated_at   = clock_timestamp()
    FROM (
        SELECT c.job_id, c.wave_number, sum(c.planned)::bigint AS planned,
               sum(c.written)::bigint AS written
        FROM unnest(job_ids, waves, planned, written) AS c(job_id, wave_number, planned, written)
        GROUP BY c.job_id, c.wave_number
    ) d
    WHERE w.job_id = d.job_id AND w.wave_number = d.wave_number
      AND (d.planned <> 0 OR d.written <> 0);
$$;

CREATE FUNCTION wave_batches_rows_insert() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM wave_rows_apply(array_agg(job_id), array_agg(wave_number),
                            array_agg(record_count::bigint),
                            array_agg(coalesce(rows_written, 0)::bigint))
    FROM new_rows;
    RETURN NULL;
END
$$;

CREATE FUNCTION wave_batches_rows_delete() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM wave_rows_apply(array_agg(job_id), array_agg(wave_number),
                            array_agg(-record_count::bigint),
                            array_agg(-coalesce(rows_written, 0)::bigint))
    FROM old_rows;
    RETURN NULL;
END
$$;

-- Only rows whose counts changed (a heartbeat or a dispatch touches no wave row here).
CREATE FUNCTION wave_batches_rows_update() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM wave_rows_apply(array_agg(c.job_id), array_agg(c.wave_number),
                            array_agg(c.planned), array_agg(c.written))
    FROM (
        SELECT n.job_id, n.wave_number,
               (n.record_count - o.record_count)::bigint AS planned,
               (coalesce(n.rows_written, 0) - coalesce(o.rows_written, 0))::bigint AS written
        FROM new_rows n JOIN old_rows o ON o.id = n.id
        WHERE n.record_count IS DISTINCT FROM o.record_count
           OR n.rows_written IS DISTINCT FROM o.rows_written
    ) c
    HAVING count(*) > 0;
    RETURN NULL;
END
$$;

CREATE TRIGGER wave_batches_rows_insert AFTER INSERT ON wave_batches
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION wave_batches_rows_insert();
CREATE TRIGGER wave_batches_rows_delete AFTER DELETE ON wave_batches
    REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION wave_batches_rows_delete();
CREATE TRIGGER wave_batches_rows_update AFTER UPDATE ON wave_batches
    REFERENCING NEW TABLE AS new_rows OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION wave_batches_rows_update();
