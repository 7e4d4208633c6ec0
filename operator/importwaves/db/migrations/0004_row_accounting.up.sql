-- Data-level completion: row counts next to batch counts.
--
-- wave_coordination.rows_staged / rows_skipped are written at planning (staging rows of the
-- wave's record type; rows no batch can cover that spec.uncoveredRows=Skip skipped);
-- rows_planned / rows_written are kept by the statement-level counter triggers (replaced below)
-- in the same statement as every batch change, like the batch counters (rows_planned = sum of the batches'
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

-- The row counters are kept by the existing counter triggers, in the SAME single UPDATE of the
-- wave row as the batch counters: a second UPDATE of a row version this transaction created
-- re-runs the wave row's foreign-key check (FOR KEY SHARE on import_jobs), which a worker's
-- completion would then wait for behind the coordinator's job lock while holding the wave row the
-- coordinator waits for (a deadlock the integration tests found with separate row triggers).
CREATE FUNCTION wave_counts_rows_apply(
    job_ids text[], waves integer[], statuses text[], signs integer[], done timestamptz[],
    planned bigint[], written bigint[]
) RETURNS void LANGUAGE sql AS $$
    UPDATE wave_coordination w SET
        total_batches      = w.total_batches + d.total,
        pending_batches    = w.pending_batches + d.pending,
        dispatched_batches = w.dispatched_batches + d.dispatched,
        processing_batches = w.processing_batches + d.processing,
        completed_batches  = w.completed_batches + d.completed,
        failed_batches     = w.failed_batches + d.failed,
        rows_planned       = w.rows_planned + d.planned,
        rows_written       = w.rows_written + d.written,
        last_completed_at  = greatest(w.last_completed_at, d.last_done),
        status             = wave_status(
            w.total_batches + d.total, w.dispatched_batches + d.dispatched,
            w.processing_batches + d.processing, w.completed_batches + d.completed,
            w.failed_batches + d.failed),
        completed_at       = CASE
            WHEN w.total_batches + d.total > 0
                 AND w.completed_batches + d.completed = w.total_batches + d.total
            THEN coalesce(w.completed_at, clock_timestamp()) END,
        updated_at         = clock_timestamp()
    FROM (
        SELECT c.job_id, c.wave_number,
               sum(c.sign)::int AS total,
               coalesce(sum(c.sign) FILTER (WHERE c.status = 'pending'), 0)::int AS pending,
               coalesce(sum(c.sign) FILTER (WHERE c.status = 'dispatched'), 0)::int AS dispatched,
               coalesce(sum(c.sign) FILTER (WHERE c.status = 'processing'), 0)::int AS processing,
               coalesce(sum(c.sign) FILTER (WHERE c.status = 'completed'), 0)::int AS completed,
               coalesce(sum(c.sign) FILTER (WHERE c.status = 'failed'), 0)::int AS failed,
               coalesce(sum(c.planned), 0)::bigint AS planned,
               coalesce(sum(c.written), 0)::bigint AS written,
               max(c.done) FILTER (WHERE c.sign > 0 AND c.status = 'completed') AS last_done
        FROM unnest(job_ids, waves, statuses, signs, done, planned, written)
             AS c(job_id, wave_number, status, sign, done, planned, written)
        GROUP BY c.job_id, c.wave_number
    ) d
    WHERE w.job_id = d.job_id AND w.wave_number = d.wave_number;
$$;

CREATE OR REPLACE FUNCTION wave_batches_count_insert() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM wave_counts_rows_apply(array_agg(job_id), array_agg(wave_number), array_agg(status),
                                   array_agg(1), array_agg(completed_at),
                                   array_agg(record_count::bigint),
                                   array_agg(coalesce(rows_written, 0)::bigint))
    FROM new_rows;
    RETURN NULL;
END
$$;

CREATE OR REPLACE FUNCTION wave_batches_count_delete() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM wave_counts_rows_apply(array_agg(job_id), array_agg(wave_number), array_agg(status),
                                   array_agg(-1), array_agg(completed_at),
                                   array_agg(-record_count::bigint),
                                   array_agg(-coalesce(rows_written, 0)::bigint))
    FROM old_rows;
    RETURN NULL;
END
$$;

-- A row whose status or counts changed contributes +1 to its new status and -1 to its old one
-- (they cancel when only the counts changed) and its count deltas; a heartbeat touches nothing.
CREATE OR REPLACE FUNCTION wave_batches_count_update() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM wave_counts_rows_apply(array_agg(c.job_id), array_agg(c.wave_number),
                                   array_agg(c.status), array_agg(c.sign), array_agg(c.done),
                                   array_agg(c.planned), array_agg(c.written))
    FROM (
        SELECT n.job_id, n.wave_number, n.status, 1 AS sign, n.completed_at AS done,
               (n.record_count - o.record_count)::bigint AS planned,
               (coalesce(n.rows_written, 0) - coalesce(o.rows_written, 0))::bigint AS written
        FROM new_rows n JOIN old_rows o ON o.id = n.id
        WHERE n.status IS DISTINCT FROM o.status
           OR n.record_count IS DISTINCT FROM o.record_count
           OR n.rows_written IS DISTINCT FROM o.rows_written
        UNION ALL
        SELECT o.job_id, o.wave_number, o.status, -1, NULL, 0::bigint, 0::bigint
        FROM new_rows n JOIN old_rows o ON o.id = n.id
        WHERE n.status IS DISTINCT FROM o.status
           OR n.record_count IS DISTINCT FROM o.record_count
           OR n.rows_written IS DISTINCT FROM o.rows_written
    ) c
    HAVING count(*) > 0;
    RETURN NULL;
END
$$;
