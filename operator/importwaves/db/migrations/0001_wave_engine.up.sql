-- The wave engine's own tables. Runs with search_path set to the tenant schema.

CREATE TABLE import_jobs (
    job_id                     text PRIMARY KEY,
    spec                       jsonb NOT NULL,
    status                     text NOT NULL DEFAULT 'running'
        CHECK (status IN ('running', 'completed', 'failed', 'suspended')),
    status_reason              text NOT NULL DEFAULT '',
    planned_at                 timestamptz,
    completed_at               timestamptz,
    last_dispatch_lag_seconds  double precision,
    created_at                 timestamptz NOT NULL DEFAULT clock_timestamp(),
    updated_at                 timestamptz NOT NULL DEFAULT clock_timestamp()
);

CREATE TABLE wave_coordination (
    job_id               text NOT NULL REFERENCES import_jobs (job_id) ON DELETE CASCADE,
    wave_number          integer NOT NULL,
    record_type_id       integer NOT NULL,
    record_type_name     text NOT NULL,
    dependency_level     smallint NOT NULL CHECK (dependency_level IN (-1, -2)),
    status               text NOT NULL DEFAULT 'pending'
        CHECK (status IN ('pending', 'dispatched', 'processing', 'completed', 'failed')),
    -- Counters are maintained by the wave_batches triggers in the same transaction as every
    -- batch change, so they always equal the batch rows.
    total_batches        integer NOT NULL DEFAULT 0,
    pending_batches      integer NOT NULL DEFAULT 0,
    dispatched_batches   integer NOT NULL DEFAULT 0,
    processing_batches   integer NOT NULL DEFAULT 0,
    completed_batches    integer NOT NULL DEFAULT 0,
    failed_batches       integer NOT NULL DEFAULT 0,
    last_completed_at    timestamptz,
    first_dispatched_at  timestamptz,
    dispatch_lag_seconds double precision,
    completed_at         timestamptz,
    created_at           timestamptz NOT NULL DEFAULT clock_timestamp(),
    updated_at           timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (job_id, wave_number),
    UNIQUE (job_id, record_type_id)
);

CREATE TABLE wave_batches (
    id                   bigserial PRIMARY KEY,
    job_id               text NOT NULL,
    batch_id             text NOT NULL,
    wave_number          integer NOT NULL,
    record_type_id       integer NOT NULL,
    status               text NOT NULL DEFAULT 'pending'
        CHECK (status IN ('pending', 'dispatched', 'processing', 'completed', 'failed')),
    -- Record ids (main batches) or parent ids (derived batches): the batch's IN() list.
    chunk_ids_json       jsonb NOT NULL,
    record_count         integer NOT NULL DEFAULT 0,
    parent_batch_id      text,
    -- True on parent batches whose derived batches have not been created yet (set at planning,
    -- cleared once the derived batches exist; only completed ones are indexed).
    needs_derivation     boolean NOT NULL DEFAULT false,
    derived_created_at   timestamptz,
    -- Fencing token: bumped on every dispatch; a worker may only act on its own dispatch.
    dispatch_seq         integer NOT NULL DEFAULT 0,
    attempts             integer NOT NULL DEFAULT 0,
    worker_id            text,
    last_error           text,
    dispatched_at        timestamptz,
    started_at           timestamptz,
    heartbeat_at         timestamptz,
    completed_at         timestamptz,
    created_at           timestamptz NOT NULL DEFAULT clock_timestamp(),
    updated_at           timestamptz NOT NULL DEFAULT clock_timestamp(),
    UNIQUE (job_id, batch_id),
    FOREIGN KEY (job_id, wave_number) REFERENCES wave_coordination (job_id, wave_number)
        ON DELETE CASCADE
);

CREATE INDEX wave_batches_job_type_status ON wave_batches (job_id, record_type_id, status);
CREATE INDEX wave_batches_job_wave_status ON wave_batches (job_id, wave_number, status, id);
CREATE INDEX wave_batches_needs_derivation ON wave_batches (job_id, id)
    WHERE needs_derivation AND status = 'completed';
CREATE INDEX wave_batches_unfinished ON wave_batches (job_id, status)
    WHERE status IN ('pending', 'dispatched', 'processing');

-- Counter maintenance: statement-level triggers with transition tables, so a planner inserting
-- 100k batches touches each wave row once, and a heartbeat (no status change) touches none.
-- Each trigger turns its transition tables into signed (wave, status) changes; one function
-- applies them.
-- A wave's status is a pure function of its counters (pending/dispatched/processing/completed/
-- failed), so it can never disagree with its batches.
CREATE FUNCTION wave_status(
    total integer, dispatched integer, processing integer, completed integer, failed integer
) RETURNS text LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE
        WHEN total > 0 AND completed = total THEN 'completed'
        WHEN total > 0 AND completed + failed = total THEN 'failed'
        WHEN processing > 0 OR completed + failed > 0 THEN 'processing'
        WHEN dispatched > 0 THEN 'dispatched'
        ELSE 'pending'
    END
$$;

CREATE FUNCTION wave_counts_apply(
    job_ids text[], waves integer[], statuses text[], signs integer[], done timestamptz[]
) RETURNS void LANGUAGE sql AS $$
    UPDATE wave_coordination w SET
        total_batches      = w.total_batches + d.total,
        pending_batches    = w.pending_batches + d.pending,
        dispatched_batches = w.dispatched_batches + d.dispatched,
        processing_batches = w.processing_batches + d.processing,
        completed_batches  = w.completed_batches + d.completed,
        failed_batches     = w.failed_batches + d.failed,
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
               max(c.done) FILTER (WHERE c.sign > 0 AND c.status = 'completed') AS last_done
        FROM unnest(job_ids, waves, statuses, signs, done)
             AS c(job_id, wave_number, status, sign, done)
        GROUP BY c.job_id, c.wave_number
    ) d
    WHERE w.job_id = d.job_id AND w.wave_number = d.wave_number;
$$;

CREATE FUNCTION wave_batches_count_insert() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM wave_counts_apply(array_agg(job_id), array_agg(wave_number), array_agg(status),
                              array_agg(1), array_agg(completed_at))
    FROM new_rows;
    RETURN NULL;
END
$$;

CREATE FUNCTION wave_batches_count_delete() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM wave_counts_apply(array_agg(job_id), array_agg(wave_number), array_agg(status),
                              array_agg(-1), array_agg(completed_at))
    FROM old_rows;
    RETURN NULL;
END
$$;

CREATE FUNCTION wave_batches_count_update() RETURNS trigger LANGUAGE plpgsql AS $$
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

CREATE TRIGGER wave_batches_count_insert AFTER INSERT ON wave_batches
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION wave_batches_count_insert();
CREATE TRIGGER wave_batches_count_delete AFTER DELETE ON wave_batches
    REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION wave_batches_count_delete();
CREATE TRIGGER wave_batches_count_update AFTER UPDATE ON wave_batches
    REFERENCING NEW TABLE AS new_rows OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION wave_batches_count_update();
