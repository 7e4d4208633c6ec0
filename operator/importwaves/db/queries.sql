-- Every SQL statement importwaves runs against a tenant, by name.
-- Format: a header line `-- name: <query_name>`, then a `-- ` description line, then the SQL.
-- Connections run with search_path set to the tenant schema (see db/connect.py); values are
-- always parameters (%(name)s), never text.

-- name: job_insert
-- Register an import job; a second registration of the same id changes nothing.
INSERT INTO import_jobs (job_id, spec)
VALUES (%(job_id)s, %(spec)s)
ON CONFLICT (job_id) DO NOTHING
RETURNING job_id;

-- name: job_set_launch_target
-- Store where the job's workers run (launch/port.py LaunchTarget) at submit; a submit without
-- one keeps the stored target.
UPDATE import_jobs SET launch_target = coalesce(%(target)s, launch_target),
    updated_at = clock_timestamp()
WHERE job_id = %(job_id)s AND launch_target IS DISTINCT FROM coalesce(%(target)s, launch_target);

-- name: job_workers_view
-- What the worker sync reads (engine/workers.py): the job's status, spec and launch target.
SELECT job_id, status, spec, launch_target FROM import_jobs WHERE job_id = %(job_id)s;

-- name: batches_held
-- The worker sync: batches handed to workers (dispatched or processing), whose worker holds
-- them, and how long since their last sign of life by the database's clock (heartbeat, claim
-- or dispatch), and since its dispatch.
SELECT batch_id, wave_number, record_type_id, status, dispatch_seq, attempts, worker_id,
       extract(epoch FROM clock_timestamp()
               - coalesce(heartbeat_at, started_at, dispatched_at))::double precision AS quiet,
       extract(epoch FROM clock_timestamp() - dispatched_at)::double precision AS since_dispatch
FROM wave_batches
WHERE job_id = %(job_id)s AND status IN ('dispatched', 'processing')
ORDER BY id;

-- name: job_attempts
-- The local runner's summary: attempts the job's workers made and batches completed.
SELECT coalesce(sum(attempts), 0)::bigint AS attempts,
       count(*) FILTER (WHERE status = 'completed') AS completed
FROM wave_batches WHERE job_id = %(job_id)s;

-- name: job_lock
-- Take the per-job lock (serializes every decision about one job) and read the job row.
SELECT job_id, spec, status, status_reason, planned_at, completed_at, last_dispatch_lag_seconds,
       refusal, refused_spec, spec_uid, spec_generation
FROM import_jobs WHERE job_id = %(job_id)s FOR UPDATE;

-- name: job_get
-- Read the job row without locking it.
SELECT job_id, spec, status, status_reason, planned_at, completed_at, last_dispatch_lag_seconds,
       created_at, updated_at, status_code, staging_report, refusal, refused_spec
FROM import_jobs WHERE job_id = %(job_id)s;

-- name: job_list
-- Every job in the tenant, newest first.
SELECT job_id, status, status_reason, created_at, completed_at
FROM import_jobs ORDER BY created_at DESC;

-- name: job_set_spec
-- Replace the stored spec (only changes that can apply to a running import reach this).
UPDATE import_jobs SET spec = %(spec)s, updated_at = clock_timestamp()
WHERE job_id = %(job_id)s;

-- name: job_set_status
-- Record the job's status; completed_at is stamped only on completion.
UPDATE import_jobs
SET status = %(status)s,
    status_reason = %(reason)s,
    completed_at = CASE WHEN %(status)s = 'completed' THEN clock_timestamp() END,
    updated_at = clock_timestamp()
WHERE job_id = %(job_id)s;

-- name: job_set_refusal
-- Record the spec change the engine refused (and the refused spec), or clear it ('' and NULL)
-- once a submitted spec is accepted; changes nothing when it already says so.
UPDATE import_jobs SET refusal = %(refusal)s, refused_spec = %(refused_spec)s,
    updated_at = clock_timestamp()
WHERE job_id = %(job_id)s
  AND (refusal IS DISTINCT FROM %(refusal)s OR refused_spec IS DISTINCT FROM %(refused_spec)s);

-- name: job_set_spec_source
-- The ImportJob (uid) and generation whose spec was last submitted (applied or refused).
UPDATE import_jobs SET spec_uid = %(uid)s, spec_generation = %(generation)s
WHERE job_id = %(job_id)s
  AND (spec_uid IS DISTINCT FROM %(uid)s OR spec_generation IS DISTINCT FROM %(generation)s);

-- name: job_cancel
-- The ImportJob was deleted: the job is cancelled (a completed job stays completed); nothing is
-- dispatched for it until it is submitted again. Returns the status it had.
UPDATE import_jobs j SET status = 'cancelled', status_code = 'ImportJobDeleted',
    status_reason = %(reason)s, updated_at = clock_timestamp()
FROM (SELECT job_id, status FROM import_jobs WHERE job_id = %(job_id)s FOR UPDATE) old
WHERE j.job_id = old.job_id AND old.status NOT IN ('completed', 'cancelled')
RETURNING old.status AS was;

-- name: job_reopen
-- A cancelled job submitted again (its ImportJob re-applied): running again.
UPDATE import_jobs SET status = 'running', status_code = '',
    status_reason = 'reopened: its ImportJob was applied again', updated_at = clock_timestamp()
WHERE job_id = %(job_id)s AND status = 'cancelled'
RETURNING job_id;

-- name: batches_release
-- Release a cancelled (or reopened) job's batches handed to workers: back to pending under a
-- new fencing token (a late worker of the old dispatch is fenced out; rows written by a
-- completed batch are kept, an uncommitted attempt rolls back), no attempt counted, no back-off.
-- A row locked right now is in a worker's hands and is skipped (see
-- batches_demote_stale_processing); it finishes or fails by itself.
UPDATE wave_batches b
SET status = 'pending', dispatch_seq = b.dispatch_seq + 1, worker_id = NULL,
    heartbeat_at = NULL, retry_after = NULL, last_error = %(reason)s,
    updated_at = clock_timestamp()
WHERE b.id IN (
    SELECT id FROM wave_batches
    WHERE job_id = %(job_id)s AND status IN ('dispatched', 'processing')
    FOR UPDATE SKIP LOCKED
)
RETURNING b.batch_id;

-- name: batches_release_unclaimed
-- A suspended job's dispatched batches that no worker claimed or reserved: back to pending, no
-- attempt counted (a late worker of that dispatch is fenced: its claim needs `dispatched`, and
-- the next dispatch takes a new token) (its workers exit on seeing the job suspended, so
-- nobody would claim them; they count as active until the claim timeout otherwise). Batches in
-- a worker's hands (processing, or reserved for a custom command) finish by themselves.
UPDATE wave_batches b
SET status = 'pending', heartbeat_at = NULL, retry_after = NULL, last_error = %(reason)s,
    updated_at = clock_timestamp()
WHERE b.id IN (
    SELECT id FROM wave_batches
    WHERE job_id = %(job_id)s AND status = 'dispatched' AND worker_id IS NULL
    FOR UPDATE SKIP LOCKED
)
RETURNING b.batch_id;

-- name: job_set_planned
-- Mark the job as planned (waves and main batches exist).
UPDATE import_jobs SET planned_at = clock_timestamp(), updated_at = clock_timestamp()
WHERE job_id = %(job_id)s;

-- name: job_active_count
-- Jobs still running in this tenant (the queue.active_jobs.count metric).
SELECT count(*) AS n FROM import_jobs WHERE status = 'running';

-- name: job_specs_running
-- Specs of the running jobs (which record types are derived, for the backlog gauge).
SELECT spec FROM import_jobs WHERE status = 'running';

-- name: wave_insert
-- Create a wave row (idempotent). Batch counters start at zero and are kept by triggers.
INSERT INTO wave_coordination
    (job_id, wave_number, record_type_id, record_type_name, dependency_level)
VALUES (%(job_id)s, %(wave_number)s, %(record_type_id)s, %(record_type_name)s,
        %(dependency_level)s)
ON CONFLICT (job_id, wave_number) DO NOTHING;

-- name: waves_snapshot
-- The job's waves with their trigger-maintained counters: the coordinator's snapshot.
SELECT wave_number, record_type_id, record_type_name, dependency_level, status,
       total_batches, pending_batches, dispatched_batches, processing_batches,
       completed_batches, failed_batches, last_completed_at, first_dispatched_at,
       dispatch_lag_seconds, rows_staged, rows_skipped, rows_planned, rows_written
FROM wave_coordination WHERE job_id = %(job_id)s ORDER BY wave_number;

-- name: job_snapshot
-- The coordinator's snapshot in one statement: the job's waves with their trigger-maintained
-- counters, every row also carrying how many completed parent batches still await their derived
-- batches (counted up to `limit`). One statement, so both are read at the same instant.
SELECT w.wave_number, w.record_type_id, w.record_type_name, w.dependency_level, w.status,
       w.total_batches, w.pending_batches, w.dispatched_batches, w.processing_batches,
       w.completed_batches, w.failed_batches, w.last_completed_at, w.first_dispatched_at,
       w.dispatch_lag_seconds, w.rows_staged, w.rows_skipped, w.rows_planned, w.rows_written,
       a.n AS awaiting_derivation
FROM wave_coordination w
CROSS JOIN (
    SELECT count(*) AS n FROM (
        SELECT 1 FROM wave_batches
        WHERE job_id = %(job_id)s AND needs_derivation AND status = 'completed'
        LIMIT %(limit)s
    ) x
) a
WHERE w.job_id = %(job_id)s
ORDER BY w.wave_number;

-- name: plan_main_batches
-- Cut one main record type's staging rows into batches of batch_size ids, in id order.
-- Server-side and idempotent: re-planning inserts nothing new.
INSERT INTO wave_batches
    (job_id, batch_id, wave_number, record_type_id, chunk_ids_json, record_count,
     needs_derivation)
SELECT %(job_id)s,
       -- lpad truncates longer strings: never let it (a cut id collides and is dropped)
       %(prefix)s || '-' || lpad(g.grp::text, greatest(6, length(g.grp::text)), '0'),
       %(wave_number)s, %(record_type_id)s,
       jsonb_agg(g.record_id ORDER BY g.record_id), count(*), %(needs_derivation)s
FROM (
    SELECT record_id, (row_number() OVER (ORDER BY record_id) - 1) / %(batch_size)s AS grp
    FROM staging_records
    WHERE job_id = %(job_id)s AND record_type_id = %(record_type_id)s
) g
GROUP BY g.grp
ON CONFLICT (job_id, batch_id) DO NOTHING;

-- name: batches_dispatch
-- Move up to `limit` pending batches of a wave to dispatched, bumping each fencing token.
-- A batch whose failed attempt's back-off (retry_after) has not passed yet waits.
UPDATE wave_batches b
SET status = 'dispatched', dispatch_seq = b.dispatch_seq + 1,
    dispatched_at = clock_timestamp(), started_at = NULL, heartbeat_at = NULL, worker_id = NULL,
    updated_at = clock_timestamp()
WHERE b.id IN (
    SELECT id FROM wave_batches
    WHERE job_id = %(job_id)s AND wave_number = %(wave_number)s AND status = 'pending'
      AND (retry_after IS NULL OR retry_after <= clock_timestamp())
    ORDER BY id LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
)
RETURNING b.batch_id, b.wave_number, b.record_type_id, b.dispatch_seq, b.attempts;

-- name: batches_dispatch_first
-- batches_dispatch for a wave never dispatched before, stamping in the same statement (one
-- round trip, on the path the derived dispatch lag measures) the wave's first dispatch and its
-- dispatch lag: the database clock now minus ready_at, when the wave became dispatchable; the
-- job keeps the lag for the status view. Every returned row carries the lag.
WITH d AS (
    UPDATE wave_batches b
    SET status = 'dispatched', dispatch_seq = b.dispatch_seq + 1,
        dispatched_at = clock_timestamp(), started_at = NULL, heartbeat_at = NULL,
        worker_id = NULL, updated_at = clock_timestamp()
    WHERE b.id IN (
        SELECT id FROM wave_batches
        WHERE job_id = %(job_id)s AND wave_number = %(wave_number)s AND status = 'pending'
          AND (retry_after IS NULL OR retry_after <= clock_timestamp())
        ORDER BY id LIMIT %(limit)s
        FOR UPDATE SKIP LOCKED
    )
    RETURNING b.batch_id, b.wave_number, b.record_type_id, b.dispatch_seq, b.attempts
), w AS (
    UPDATE wave_coordination
    SET first_dispatched_at = coalesce(first_dispatched_at, clock_timestamp()),
        dispatch_lag_seconds = coalesce(
            dispatch_lag_seconds,
            greatest(0, extract(epoch FROM clock_timestamp()
                                           - %(ready_at)s::timestamptz))::double precision),
        updated_at = clock_timestamp()
    WHERE job_id = %(job_id)s AND wave_number = %(wave_number)s AND EXISTS (SELECT 1 FROM d)
    RETURNING dispatch_lag_seconds
), j AS (
    UPDATE import_jobs
    SET last_dispatch_lag_seconds = w.dispatch_lag_seconds, updated_at = clock_timestamp()
    FROM w
    WHERE import_jobs.job_id = %(job_id)s AND w.dispatch_lag_seconds IS NOT NULL
    RETURNING 1
)
SELECT d.*, (SELECT dispatch_lag_seconds FROM w) AS lag FROM d;

-- name: batches_dispatched_list
-- Batches currently handed to workers (dispatched or processing), for launchers to re-ensure.
SELECT batch_id, wave_number, record_type_id, dispatch_seq, attempts, status
FROM wave_batches
WHERE job_id = %(job_id)s AND status IN ('dispatched', 'processing')
ORDER BY id;

-- name: batch_redispatch
-- Adopt an orphaned dispatch (its launcher died between the dispatch and the launch): the same
-- batch, dispatched again under a new fencing token, so the adopted worker and a late worker of
-- the lost launch never share a token (the late one is fenced out). Still `dispatched`; only
-- the current dispatch can be adopted, and no attempt is counted (the worker never ran).
UPDATE wave_batches
SET dispatch_seq = dispatch_seq + 1, dispatched_at = clock_timestamp(),
    updated_at = clock_timestamp()
WHERE job_id = %(job_id)s AND batch_id = %(batch_id)s AND dispatch_seq = %(dispatch_seq)s
  AND status = 'dispatched'
RETURNING batch_id, wave_number, record_type_id, dispatch_seq, attempts;

-- name: batch_claim_next
-- A pooled worker claims the next dispatched batch of its job (of one wave when wave_number is
-- set) that no worker reserved, under that batch's fencing token: dispatched -> processing,
-- counting the attempt. SKIP LOCKED: two workers never take the same row, and neither waits.
-- Only while the job exists and its status is none of done_statuses (the worker sends this with
-- its read of the job row, in one round trip, without waiting for that read's reply).
UPDATE wave_batches b
SET status = 'processing', attempts = b.attempts + 1, started_at = clock_timestamp(),
    heartbeat_at = clock_timestamp(), worker_id = %(worker_id)s, updated_at = clock_timestamp()
WHERE b.id = (
    SELECT id FROM wave_batches
    WHERE job_id = %(job_id)s AND status = 'dispatched' AND worker_id IS NULL
      AND (%(wave_number)s::integer IS NULL OR wave_number = %(wave_number)s::integer)
    ORDER BY id LIMIT 1
    FOR UPDATE SKIP LOCKED
)
AND EXISTS (
    SELECT 1 FROM import_jobs j
    WHERE j.job_id = %(job_id)s AND NOT j.status = ANY(%(done_statuses)s::text[])
)
RETURNING b.batch_id, b.dispatch_seq, b.record_type_id, b.chunk_ids_json, b.attempts,
          (SELECT p.record_type_id FROM wave_batches p
           WHERE p.job_id = b.job_id AND p.batch_id = b.parent_batch_id)
          AS parent_record_type_id;

-- name: wave_left
-- A wave's pooled worker's look at its wave (sent with its claim): a main wave (dependency_level
-- -1: every batch made at planning) with no batch left to run (none pending, dispatched or
-- processing) gets no more work for the Job it runs in (a retry the engine requeues later gets a
-- new Job). A derived wave grows while its parents complete: its workers wait for their idle
-- timeout or the job's end.
SELECT dependency_level, total_batches,
       pending_batches + dispatched_batches + processing_batches AS batches_left
FROM wave_coordination WHERE job_id = %(job_id)s AND wave_number = %(wave_number)s;

-- name: batch_reserve_next
-- A pooled worker running a custom worker command reserves the next dispatched batch (it stays
-- `dispatched`, with this worker's id, so no other pooled worker takes it); the command then
-- claims it with batch_claim under its dispatch_seq, as a per-batch worker does.
UPDATE wave_batches b
SET worker_id = %(worker_id)s, heartbeat_at = clock_timestamp(), updated_at = clock_timestamp()
WHERE b.id = (
    SELECT id FROM wave_batches
    WHERE job_id = %(job_id)s AND status = 'dispatched' AND worker_id IS NULL
      AND (%(wave_number)s::integer IS NULL OR wave_number = %(wave_number)s::integer)
    ORDER BY id LIMIT 1
    FOR UPDATE SKIP LOCKED
)
RETURNING b.batch_id, b.dispatch_seq, b.record_type_id;

-- name: job_status_get
-- A pooled worker's look at its job: its status (no row: the job is gone).
SELECT status FROM import_jobs WHERE job_id = %(job_id)s;

-- name: batch_get
-- One batch row.
SELECT batch_id, wave_number, record_type_id, status, chunk_ids_json, record_count,
       needs_derivation, dispatch_seq, attempts, worker_id, last_error, dispatched_at,
       started_at, heartbeat_at, completed_at
FROM wave_batches WHERE job_id = %(job_id)s AND batch_id = %(batch_id)s;

-- name: batch_claim
-- A worker claims its dispatch: dispatched -> processing, counting the attempt. A batch a pooled
-- worker reserved for the custom command it runs (batch_reserve_next) keeps that pooled
-- worker's id: the engine watches the pooled worker, not the command.
UPDATE wave_batches
SET status = 'processing', attempts = attempts + 1, started_at = clock_timestamp(),
    heartbeat_at = clock_timestamp(), worker_id = coalesce(worker_id, %(worker_id)s),
    updated_at = clock_timestamp()
WHERE job_id = %(job_id)s AND batch_id = %(batch_id)s AND dispatch_seq = %(dispatch_seq)s
  AND status = 'dispatched'
RETURNING record_type_id, chunk_ids_json, attempts,
          (SELECT p.record_type_id FROM wave_batches p
           WHERE p.job_id = wave_batches.job_id AND p.batch_id = wave_batches.parent_batch_id)
          AS parent_record_type_id;

-- name: batch_lock
-- Lock one batch row (a worker holds it while importing, so a concurrent requeue waits).
SELECT status, dispatch_seq, record_type_id, chunk_ids_json, record_count
FROM wave_batches WHERE job_id = %(job_id)s AND batch_id = %(batch_id)s FOR UPDATE;

-- name: notify_tenant_if_dispatched
-- The coordinator's prompt (as notify_tenant), sent in the same round trip as its dispatch
-- statements, whose replies it has not read: only if the job's status changed or this run
-- dispatched a batch of one of `waves` (one dispatched since this transaction began: under the
-- job lock, this run's dispatch).
SELECT pg_notify(%(channel)s, %(payload)s)
WHERE %(changed)s OR EXISTS (
    SELECT 1 FROM wave_batches
    WHERE job_id = %(job_id)s AND wave_number = ANY(%(waves)s) AND status = 'dispatched'
      AND dispatched_at >= now()
);

-- name: relaxed_commit
-- The coordinator, in a run that records no job status (it dispatched, created derived batches,
-- counted an exit without completion, or changed nothing): its COMMIT does not wait for the WAL
-- flush (fsync), most of a commit's time on the path the derived dispatch lag measures. What a
-- server crash can lose is only such a run's last decisions, never a worker's completion (the
-- worker's transaction sets synchronous_commit on: batch_complete_notify); the WAL is flushed in
-- order, so a worker's claim or completion that is durable makes the dispatch it acted on
-- durable too. A decision lost in a crash is made again by the next run (level-based: the rows
-- are the truth). A run that changes the job's status (completed, failed, ...) commits durably.
SELECT set_config('synchronous_commit', 'off', true);

-- name: notify_tenant
-- A prompt on the tenant's channel (engine/notify.py): batches were dispatched (pooled workers
-- try to claim), a job changed status, a batch failed. Delivered at the commit of the
-- surrounding transaction; never the truth: the rows are.
SELECT pg_notify(%(channel)s, %(payload)s);

-- name: batch_complete_notify
-- The reference worker's completion, after batch_lock (held FOR UPDATE: this dispatch's row,
-- status processing, so the update below matches it) and the import upsert in the same
-- transaction: batch_complete, the tenant's completion prompt (pg_notify, delivered only if the
-- transaction commits; a prompt to look at the database, never the truth: the row is) and a
-- durable commit (synchronous_commit on for this transaction, whatever the server's default:
-- with it off a crash loses the last commits, and the runner would then hold an exit 0 for a
-- completion the database no longer has), in one statement. Returns nothing if no row matched.
WITH done AS (
    UPDATE wave_batches
    SET status = 'completed', completed_at = clock_timestamp(), last_error = NULL,
        rows_written = %(rows_written)s, updated_at = clock_timestamp()
    WHERE job_id = %(job_id)s AND batch_id = %(batch_id)s AND dispatch_seq = %(dispatch_seq)s
      AND status IN ('dispatched', 'processing')
    RETURNING wave_number, record_type_id, record_count
)
SELECT done.*, pg_notify(%(channel)s, %(payload)s) AS notified,
       set_config('synchronous_commit', 'on', true) AS synchronous_commit
FROM done;

-- name: batch_heartbeat
-- A running worker's liveness signal; no status change, so no counter is touched.
UPDATE wave_batches SET heartbeat_at = clock_timestamp()
WHERE job_id = %(job_id)s AND batch_id = %(batch_id)s AND dispatch_seq = %(dispatch_seq)s
  AND status = 'processing';

-- name: batch_fail
-- Record a failed attempt for the current dispatch: back to pending, or failed when out of
-- attempts. A dispatch that failed before its worker claimed it still counts an attempt.
-- A batch back to pending waits its back-off before the next dispatch: backoff_base * 2^(n-1)
-- seconds after its n-th failed attempt, at most backoff_cap (spec.retryBackoff).
UPDATE wave_batches
SET attempts = attempts + CASE WHEN status = 'dispatched' THEN 1 ELSE 0 END,
    status = CASE
        WHEN attempts + CASE WHEN status = 'dispatched' THEN 1 ELSE 0 END >= %(max_attempts)s
        THEN 'failed' ELSE 'pending' END,
    retry_after = clock_timestamp() + make_interval(secs => least(
        %(backoff_cap)s::double precision,
        %(backoff_base)s::double precision
            * power(2, greatest(0, attempts + CASE WHEN status = 'dispatched' THEN 1 ELSE 0 END
                                   - 1)))),
    last_error = %(error)s, heartbeat_at = NULL, updated_at = clock_timestamp()
WHERE job_id = %(job_id)s AND batch_id = %(batch_id)s AND dispatch_seq = %(dispatch_seq)s
  AND status IN ('dispatched', 'processing')
RETURNING status, attempts;

-- name: batches_demote_stale_processing
-- Recovery: processing batches whose heartbeat is older than stale_after go back to pending
-- (or to failed when the lost attempt was their last). A batch row locked right now is in a
-- worker's hands (claiming, heartbeating, completing): not stale, skipped. Waiting for it
-- instead deadlocked: recovery's first statement holds the wave's counter row (its trigger)
-- when its second waits for a batch row, and a worker holding that batch row waits for the
-- counter row (found by the guard-rule soak).
UPDATE wave_batches b
SET status = CASE WHEN b.attempts >= %(max_attempts)s THEN 'failed' ELSE 'pending' END,
    last_error = 'stale: no heartbeat for ' || %(stale_after)s || ' s (worker '
                 || coalesce(b.worker_id, '?') || ')',
    heartbeat_at = NULL, updated_at = clock_timestamp()
WHERE b.id IN (
    SELECT id FROM wave_batches
    WHERE job_id = %(job_id)s AND status = 'processing'
      AND coalesce(heartbeat_at, started_at, dispatched_at)
          < clock_timestamp() - make_interval(secs => %(stale_after)s)
    FOR UPDATE SKIP LOCKED
)
RETURNING b.batch_id, b.status, b.attempts;

-- name: batch_unclaimed_requeue
-- Recovery: a dispatched batch no worker claimed within claim_timeout, back to pending, as
-- engine/workers.py plan_unclaimed decided: with count, the lost launch costs an attempt (failed
-- when it was its last: a launcher that keeps losing them ends in `failed` with this message
-- instead of looping); without, it is released (its group had no live worker). Only the same
-- dispatch, still unclaimed (and still reserved by the same pooled worker, if it was: its
-- custom command did not claim it in time); a locked row is in a worker's hands (claiming) and is skipped (see
-- batches_demote_stale_processing).
UPDATE wave_batches b
SET attempts = b.attempts + CASE WHEN %(count)s THEN 1 ELSE 0 END,
    status = CASE WHEN %(count)s AND b.attempts + 1 >= %(max_attempts)s
                  THEN 'failed' ELSE 'pending' END,
    last_error = %(error)s,
    updated_at = clock_timestamp()
WHERE b.id IN (
    SELECT id FROM wave_batches
    WHERE job_id = %(job_id)s AND batch_id = %(batch_id)s AND dispatch_seq = %(dispatch_seq)s
      AND status = 'dispatched' AND worker_id IS NOT DISTINCT FROM %(worker_id)s
    FOR UPDATE SKIP LOCKED
)
RETURNING b.batch_id, b.status, b.attempts;

-- name: batches_requeue_failed
-- Retry failed batches (argo-retry style): back to pending with fresh attempts; completed
-- batches are kept.
UPDATE wave_batches
SET status = 'pending', attempts = 0, retry_after = NULL,
    last_error = 'requeued by retry-failed; was: ' || coalesce(last_error, ''),
    updated_at = clock_timestamp()
WHERE job_id = %(job_id)s AND status = 'failed'
RETURNING batch_id, status, attempts;

-- name: batches_needing_derivation
-- Completed parent batches whose derived batches have not been created yet (several derived
-- types: the set their derived_batches_create statements share).
SELECT batch_id, record_type_id FROM wave_batches
WHERE job_id = %(job_id)s AND needs_derivation AND status = 'completed'
ORDER BY id LIMIT %(limit)s;

-- name: derived_batches_create
-- Create the derived batches of one derived type for every completed parent batch that still
-- lacks them (up to `limit` parent batches, oldest first; or only those in parent_batch_ids):
-- each parent batch's children in staging, grouped by parent id into batches of about
-- batch_size records. The parent ids are the parent batches' own chunk_ids_json, read in this
-- statement (the DB copy is the truth: no cache, no extra round trip). With mark_derived the
-- same statement records that those parent batches' derived batches exist. Deterministic ids
-- make it idempotent. Returns one row: how many parent batches it read, and what it created.
WITH parents AS (
    SELECT batch_id, record_type_id, chunk_ids_json FROM wave_batches
    WHERE job_id = %(job_id)s AND needs_derivation AND status = 'completed'
      AND record_type_id = ANY(%(parent_type_ids)s)
      AND (%(parent_batch_ids)s::text[] IS NULL OR batch_id = ANY(%(parent_batch_ids)s::text[]))
    ORDER BY id
    LIMIT %(limit)s
), marked AS (
    -- a data-modifying CTE runs once whether or not it is referenced
    UPDATE wave_batches w
    SET needs_derivation = false, derived_created_at = clock_timestamp(),
        updated_at = clock_timestamp()
    FROM parents p
    WHERE %(mark_derived)s AND w.job_id = %(job_id)s AND w.batch_id = p.batch_id
    RETURNING w.batch_id
), children AS (
    SELECT p.batch_id AS parent_batch_id, s.parent_id, count(*) AS n
    FROM parents p
    CROSS JOIN LATERAL jsonb_array_elements_text(p.chunk_ids_json) AS ids(id)
    JOIN staging_records s
      ON s.job_id = %(job_id)s AND s.record_type_id = %(record_type_id)s
     AND s.parent_id = ids.id::bigint
     AND (s.parent_record_type_id IS NULL OR s.parent_record_type_id = p.record_type_id)
    GROUP BY p.batch_id, s.parent_id
), grouped AS (
    SELECT parent_batch_id, parent_id, n,
           -- grp is (records before, in this parent batch) / batch_size; sum(bigint) is
           -- numeric: cast back so the division truncates instead of rounding (rounding would
           -- cut a half-size first batch and one batch too many)
           ((sum(n) OVER (PARTITION BY parent_batch_id ORDER BY parent_id) - n)::bigint
             / %(batch_size)s)::int AS grp
    FROM children
), created AS (
    INSERT INTO wave_batches
        (job_id, batch_id, wave_number, record_type_id, chunk_ids_json, record_count,
         parent_batch_id)
    SELECT %(job_id)s,
           -- grp is sparse: it passes 9999 in a wide parent batch, and lpad would cut it to a
           -- colliding id whose batch ON CONFLICT then silently drops
           %(name)s || '-' || g.parent_batch_id || '-'
             || lpad(g.grp::text, greatest(4, length(g.grp::text)), '0'),
           %(wave_number)s, %(record_type_id)s,
           jsonb_agg(g.parent_id ORDER BY g.parent_id), sum(g.n)::int, g.parent_batch_id
    FROM grouped g
    GROUP BY g.parent_batch_id, g.grp
    ON CONFLICT (job_id, batch_id) DO NOTHING
    RETURNING batch_id, parent_batch_id
)
SELECT (SELECT count(*) FROM parents) AS parents,
       coalesce((SELECT array_agg(batch_id ORDER BY batch_id) FROM created), '{}') AS batch_ids,
       coalesce((SELECT array_agg(parent_batch_id ORDER BY batch_id) FROM created), '{}')
         AS parent_batch_ids;

-- name: batches_mark_derived
-- These parent batches' derived batches exist now (after one derived_batches_create per derived
-- type, when several derived types read them).
UPDATE wave_batches
SET needs_derivation = false, derived_created_at = clock_timestamp(),
    updated_at = clock_timestamp()
WHERE job_id = %(job_id)s AND batch_id = ANY(%(batch_ids)s) AND needs_derivation;

-- name: unfinished_by_type
-- The completion guard's fresh look at the batches themselves: non-terminal batches per
-- record type (the seed's `record_type_id = -13 AND status IN (...)` check, for all types).
SELECT record_type_id, status, count(*) AS n FROM wave_batches
WHERE job_id = %(job_id)s AND status IN ('pending', 'dispatched', 'processing')
GROUP BY record_type_id, status;

-- name: parent_threshold_reached_at
-- When parents crossed the threshold: the completion time of the k-th completed parent batch.
-- k is engine/model.py parents_needed(threshold, parent batches), computed in Python (the one
-- threshold formula; this query does not compute it).
SELECT completed_at FROM wave_batches
WHERE job_id = %(job_id)s AND record_type_id = ANY(%(parent_type_ids)s) AND status = 'completed'
ORDER BY completed_at OFFSET %(k)s - 1 LIMIT 1;

-- name: batches_by_type_status
-- Operator view: batch counts by record type and status.
SELECT record_type_id, status, count(*) AS n FROM wave_batches
WHERE job_id = %(job_id)s GROUP BY record_type_id, status ORDER BY record_type_id, status;

-- name: batches_stuck
-- Operator view: batches that look stuck (no heartbeat for stale_after / not claimed for
-- claim_timeout).
SELECT batch_id, record_type_id, status, attempts, worker_id, dispatched_at, heartbeat_at,
       last_error
FROM wave_batches
WHERE job_id = %(job_id)s
  AND ((status = 'processing' AND coalesce(heartbeat_at, started_at, dispatched_at)
            < clock_timestamp() - make_interval(secs => %(stale_after)s))
    OR (status = 'dispatched'
        AND dispatched_at < clock_timestamp() - make_interval(secs => %(claim_timeout)s)))
ORDER BY id LIMIT 50;

-- name: batches_failed
-- Operator view: failed batches with their last error.
SELECT batch_id, record_type_id, attempts, last_error FROM wave_batches
WHERE job_id = %(job_id)s AND status = 'failed' ORDER BY id LIMIT %(limit)s;

-- name: workers_with_failed_attempt
-- The worker sync's discard: which of these ended workers ran a batch whose last attempt failed
-- (its row still names them), so a launcher may keep them a while for diagnosis.
SELECT DISTINCT worker_id FROM wave_batches
WHERE job_id = %(job_id)s AND worker_id = ANY(%(worker_ids)s)
  AND status IN ('pending', 'failed') AND last_error IS NOT NULL;

-- name: batch_launch_error_latest
-- Status view: the newest launch problem recorded on a batch still waiting to run (its last
-- attempt failed because its workers could not be started), for the Progressing condition.
SELECT last_error FROM wave_batches
WHERE job_id = %(job_id)s AND status IN ('pending', 'dispatched')
  AND last_error LIKE 'launch failed:%%'
ORDER BY updated_at DESC, id DESC LIMIT 1;

-- name: batches_failed_recent
-- BatchFailed Events: failed batches with record type, wave and last error, newest first.
SELECT batch_id, record_type_id, wave_number, attempts, last_error FROM wave_batches
WHERE job_id = %(job_id)s AND status = 'failed'
ORDER BY updated_at DESC, id DESC LIMIT %(limit)s;

-- name: batches_retrying_recent
-- Warning Events and the Progressing message: batches back to pending after a failed attempt
-- (batch_fail set their back-off), waiting for their retry, with the attempt's error; newest
-- first. A batch released by a deleted ImportJob (retry_after cleared) is not one.
SELECT batch_id, record_type_id, wave_number, attempts, last_error FROM wave_batches
WHERE job_id = %(job_id)s AND status = 'pending' AND retry_after IS NOT NULL
  AND attempts > 0 AND last_error IS NOT NULL
ORDER BY updated_at DESC, id DESC LIMIT %(limit)s;

-- name: derived_backlog
-- Derived records' batches not yet completed, across running jobs (the backlog gauge).
SELECT count(*) AS n FROM wave_batches b JOIN import_jobs j USING (job_id)
WHERE j.status = 'running' AND b.record_type_id = ANY(%(derived_type_ids)s)
  AND b.status IN ('pending', 'dispatched', 'processing');

-- name: job_set_outcome
-- Record the job's status with its machine-readable code (NoStagingRecords,
-- UncoveredStagingRows, RowCountMismatch, ...; '' for none); completed_at only on completion.
UPDATE import_jobs
SET status = %(status)s,
    status_reason = %(reason)s,
    status_code = %(code)s,
    completed_at = CASE WHEN %(status)s = 'completed' THEN clock_timestamp() END,
    updated_at = clock_timestamp()
WHERE job_id = %(job_id)s;

-- name: job_set_staging_report
-- Keep the planning's staging report (staged / uncovered rows per record type, first ids).
UPDATE import_jobs SET staging_report = %(report)s, updated_at = clock_timestamp()
WHERE job_id = %(job_id)s;

-- name: staging_first_ids
-- The first record ids (in id order) of one record type's staging rows.
SELECT record_id FROM staging_records
WHERE job_id = %(job_id)s AND record_type_id = %(record_type_id)s
ORDER BY record_id LIMIT %(limit)s;

-- name: derived_uncovered
-- Planning: staging rows of one derived type that no derived batch can ever cover (parent_id
-- NULL, or naming no staged row of its parent types, or of the parent_record_type_id it names):
-- how many, and the first ids. One hash anti-join: the parent keys are read once (a
-- materialized CTE has no index, so the planner cannot choose a probe per child whatever the
-- statistics say; with staging just loaded and not analyzed, a correlated lookup per child was
-- 1M primary-key probes for 1M lines: 5.4 s, against 1.1 s for this).
WITH parents AS MATERIALIZED (
    SELECT p.record_type_id, p.record_id FROM staging_records p
    WHERE p.job_id = %(job_id)s AND p.record_type_id = ANY(%(parent_type_ids)s::integer[])
), orphans AS (
    SELECT s.record_id FROM staging_records s
    WHERE s.job_id = %(job_id)s AND s.record_type_id = %(record_type_id)s
      AND NOT EXISTS (
          SELECT 1 FROM parents p
          WHERE p.record_id = s.parent_id
            AND (s.parent_record_type_id IS NULL OR s.parent_record_type_id = p.record_type_id))
)
SELECT (SELECT count(*) FROM orphans) AS n,
       coalesce((SELECT array_agg(record_id ORDER BY record_id)
                 FROM (SELECT record_id FROM orphans ORDER BY record_id LIMIT %(limit)s) f),
                '{}') AS first_ids;

-- name: wave_set_rows
-- Planning: the wave's staged rows and the rows skipped as uncoverable (spec.uncoveredRows=Skip).
UPDATE wave_coordination SET rows_staged = %(staged)s, rows_skipped = %(skipped)s,
    updated_at = clock_timestamp()
WHERE job_id = %(job_id)s AND record_type_id = %(record_type_id)s;

-- name: rows_by_type
-- The completion check's fresh look at rows, per record type, from the batch rows themselves
-- (not the counters): rows planned (sum of record_count), rows the completing workers recorded,
-- completed batches that recorded no count, and the wave's skipped rows.
SELECT w.record_type_id, w.record_type_name, w.rows_skipped,
       coalesce(sum(b.record_count), 0)::bigint AS planned,
       coalesce(sum(b.rows_written) FILTER (WHERE b.status = 'completed'), 0)::bigint AS written,
       count(*) FILTER (WHERE b.status = 'completed' AND b.rows_written IS NULL) AS uncounted
FROM wave_coordination w
LEFT JOIN wave_batches b ON b.job_id = w.job_id AND b.wave_number = w.wave_number
WHERE w.job_id = %(job_id)s
GROUP BY w.record_type_id, w.record_type_name, w.rows_skipped
ORDER BY w.record_type_id;

-- name: batch_rows_absent
-- Reference worker: the ids of a main batch with no staging row any more (its planned count
-- cannot be written), the first few.
SELECT ids.id::bigint AS record_id
FROM jsonb_array_elements_text(%(chunk)s::jsonb) AS ids(id)
WHERE NOT EXISTS (
    SELECT 1 FROM staging_records s
    WHERE s.job_id = %(job_id)s AND s.record_type_id = %(record_type_id)s
      AND s.record_id = ids.id::bigint)
ORDER BY 1 LIMIT 10;

-- name: rows_counters_mismatch
-- Verification: waves whose row counters disagree with their batch rows (must be none).
SELECT w.wave_number, w.rows_planned, coalesce(b.planned, 0) AS actual_planned,
       w.rows_written, coalesce(b.written, 0) AS actual_written
FROM wave_coordination w
LEFT JOIN (
    SELECT wave_number, sum(record_count)::bigint AS planned,
           coalesce(sum(rows_written), 0)::bigint AS written
    FROM wave_batches WHERE job_id = %(job_id)s GROUP BY wave_number
) b USING (wave_number)
WHERE w.job_id = %(job_id)s
  AND (w.rows_planned, w.rows_written)
      IS DISTINCT FROM (coalesce(b.planned, 0)::bigint, coalesce(b.written, 0)::bigint);

-- name: import_customers
-- Reference worker: upsert a batch of customers from staging. Only valid rows (the payload
-- checks of invalid_staging_rows; keep them alike): a batch with an invalid row writes less
-- than its planned count, and the worker rolls back and names the rows.
INSERT INTO customers (id, name, imported_job)
SELECT s.record_id, s.payload ->> 'name', s.job_id FROM staging_records s
WHERE s.job_id = %(job_id)s AND s.record_type_id = %(record_type_id)s
  AND s.record_id = ANY(%(ids)s)
  AND jsonb_typeof(s.payload) = 'object' AND coalesce(s.payload ->> 'name', '') <> ''
ON CONFLICT (id) DO UPDATE SET name = excluded.name, imported_job = excluded.imported_job;

-- name: import_transactions
-- Reference worker: upsert a batch of transactions (their customer must exist: the foreign
-- key). Only rows whose payload is valid, as in import_customers.
INSERT INTO transactions (id, record_type_id, customer_id, amount, payload, imported_job)
SELECT s.record_id, s.record_type_id, s.parent_id, (s.payload ->> 'amount')::numeric,
       s.payload, s.job_id
FROM staging_records s
WHERE s.job_id = %(job_id)s AND s.record_type_id = %(record_type_id)s
  AND s.record_id = ANY(%(ids)s)
  AND jsonb_typeof(s.payload) = 'object'
  AND (s.payload ->> 'amount') ~ '^-?[0-9]{1,12}(\.[0-9]{1,2})?$'
ON CONFLICT (id) DO UPDATE SET amount = excluded.amount, payload = excluded.payload,
    customer_id = excluded.customer_id, imported_job = excluded.imported_job;

-- name: import_transaction_lines
-- Reference worker: upsert the lines of a batch of parent transactions (the parent must exist:
-- the foreign key). Only rows whose payload is valid, as in import_customers.
INSERT INTO transaction_lines (id, transaction_id, amount, payload, imported_job)
SELECT s.record_id, s.parent_id, (s.payload ->> 'amount')::numeric, s.payload, s.job_id
FROM staging_records s
WHERE s.job_id = %(job_id)s AND s.record_type_id = %(record_type_id)s
  AND s.parent_id = ANY(%(ids)s)
  AND (s.parent_record_type_id IS NULL
       OR s.parent_record_type_id = %(parent_record_type_id)s::integer)
  AND jsonb_typeof(s.payload) = 'object'
  AND (s.payload ->> 'amount') ~ '^-?[0-9]{1,12}(\.[0-9]{1,2})?$'
ON CONFLICT (id) DO UPDATE SET amount = excluded.amount, payload = excluded.payload,
    transaction_id = excluded.transaction_id, imported_job = excluded.imported_job;

-- name: invalid_staging_rows
-- Reference worker: rows of the batch that cannot be imported, with the reason (only those).
-- Run when a batch's upsert failed or wrote less than planned (the import queries skip rows
-- whose payload these checks refuse; a missing parent fails the upsert's foreign key).
-- The parent check is one primary-key probe per batch row (LATERAL ... LIMIT 1 is never turned
-- into a join the planner could hash): its cost is the batch's, whatever the size of the parent
-- table. (As NOT EXISTS inside the CASE it was a hashed subplan that read the whole parent
-- table once per batch: 52 ms per 2,500-line batch with 200,000 transactions imported.)
SELECT record_id, problem FROM (
    SELECT s.record_id,
           CASE
               WHEN jsonb_typeof(s.payload) <> 'object' THEN 'payload is not an object'
               WHEN %(needs_name)s AND coalesce(s.payload ->> 'name', '') = '' THEN 'missing name'
               WHEN NOT %(needs_name)s AND (s.payload ->> 'amount') IS NULL THEN 'missing amount'
               WHEN NOT %(needs_name)s
                    AND (s.payload ->> 'amount') !~ '^-?[0-9]{1,12}(\.[0-9]{1,2})?$'
               THEN 'amount is not a number'
               WHEN %(parent_table)s = 'customers' AND s.parent_id IS NOT NULL AND p.id IS NULL
               THEN 'parent customer ' || s.parent_id || ' not imported'
               WHEN %(parent_table)s = 'transactions' AND p.id IS NULL
               THEN 'parent transaction ' || coalesce(s.parent_id::text, 'NULL') || ' not imported'
           END AS problem
    FROM staging_records s
    LEFT JOIN LATERAL (
        SELECT c.id FROM customers c
        WHERE %(parent_table)s = 'customers' AND c.id = s.parent_id
        UNION ALL
        SELECT t.id FROM transactions t
        WHERE %(parent_table)s = 'transactions' AND t.id = s.parent_id
        LIMIT 1
    ) p ON true
    WHERE s.job_id = %(job_id)s AND s.record_type_id = %(record_type_id)s
      AND (CASE WHEN %(by_parent)s THEN s.parent_id ELSE s.record_id END) = ANY(%(ids)s)
      AND (NOT %(by_parent)s OR s.parent_record_type_id IS NULL
           OR s.parent_record_type_id = %(parent_record_type_id)s::integer)
) checked
WHERE problem IS NOT NULL
ORDER BY record_id;

-- name: staging_counts
-- Verification: staging rows per record type for a job.
SELECT record_type_id, count(*) AS n FROM staging_records WHERE job_id = %(job_id)s
GROUP BY record_type_id ORDER BY record_type_id;

-- name: target_counts
-- Verification: rows a job imported into each target table.
SELECT 'customers' AS target, count(*) AS n FROM customers WHERE imported_job = %(job_id)s
UNION ALL
SELECT 'transactions', count(*) FROM transactions WHERE imported_job = %(job_id)s
UNION ALL
SELECT 'transaction_lines', count(*) FROM transaction_lines WHERE imported_job = %(job_id)s;

-- name: orphan_lines
-- Verification: imported lines whose parent transaction is missing (must be zero).
SELECT count(*) AS n FROM transaction_lines l
WHERE l.imported_job = %(job_id)s
  AND NOT EXISTS (SELECT 1 FROM transactions t WHERE t.id = l.transaction_id);

-- name: lines_before_parent
-- Verification: lines imported before their parent transaction (must be zero).
SELECT count(*) AS n FROM transaction_lines l JOIN transactions t ON t.id = l.transaction_id
WHERE l.imported_job = %(job_id)s AND l.imported_at < t.imported_at;

-- name: counters_mismatch
-- Verification: waves whose counters disagree with their batch rows (must be none).
SELECT w.wave_number, w.total_batches, coalesce(b.n, 0) AS actual_total,
       w.completed_batches, coalesce(b.completed, 0) AS actual_completed
FROM wave_coordination w
LEFT JOIN (
    SELECT wave_number, count(*) AS n,
           count(*) FILTER (WHERE status = 'pending') AS pending,
           count(*) FILTER (WHERE status = 'dispatched') AS dispatched,
           count(*) FILTER (WHERE status = 'processing') AS processing,
           count(*) FILTER (WHERE status = 'completed') AS completed,
           count(*) FILTER (WHERE status = 'failed') AS failed
    FROM wave_batches WHERE job_id = %(job_id)s GROUP BY wave_number
) b USING (wave_number)
WHERE w.job_id = %(job_id)s
  AND (w.total_batches, w.pending_batches, w.dispatched_batches, w.processing_batches,
       w.completed_batches, w.failed_batches)
      IS DISTINCT FROM (coalesce(b.n, 0)::int, coalesce(b.pending, 0)::int,
       coalesce(b.dispatched, 0)::int, coalesce(b.processing, 0)::int,
       coalesce(b.completed, 0)::int, coalesce(b.failed, 0)::int);
