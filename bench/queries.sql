-- SQL the benchmarks run themselves (staging data and fixture states), by name, in the format of
-- operator/importwaves/db/queries.sql. The engine's own statements stay in that file; nothing
-- here is engine code.

-- name: stage_orders_flat
-- N sales orders without a customer, each with one transaction line (ids 1..N).
INSERT INTO staging_records (job_id, record_type_id, record_id, parent_id, payload)
SELECT %(job_id)s, t.rt, i, CASE WHEN t.rt = -13 THEN i END,
       jsonb_build_object('amount', to_char((i %% 997) * 1.25, 'FM9999990.00'))
FROM generate_series(1, %(n)s) AS i, (VALUES (-30), (-13)) AS t(rt)
WHERE t.rt = -30 OR %(with_lines)s
ON CONFLICT DO NOTHING;

-- name: stage_main_records
-- Main records only (planning): `customers` customers and `orders` sales orders of them.
INSERT INTO staging_records (job_id, record_type_id, record_id, parent_id, payload)
SELECT %(job_id)s, -2, i, NULL, jsonb_build_object('name', 'Customer ' || i)
FROM generate_series(1, %(customers)s) AS i
UNION ALL
SELECT %(job_id)s, -30, i, ((i - 1) %% %(customers)s) + 1,
       jsonb_build_object('amount', to_char((i %% 997) * 3.17, 'FM9999990.00'))
FROM generate_series(1, %(orders)s) AS i
ON CONFLICT DO NOTHING;

-- name: staging_count
-- Staging rows of a job.
SELECT count(*) AS n FROM staging_records WHERE job_id = %(job_id)s;

-- name: batch_count
-- Batch rows of a job.
SELECT count(*) AS n FROM wave_batches WHERE job_id = %(job_id)s;

-- name: bench_sequence_create
-- The sequence pgbench draws batch numbers from (one nextval per transaction).
CREATE SEQUENCE IF NOT EXISTS bench_batch_seq MINVALUE 0;

-- name: bench_sequence_set
-- The next batch number pgbench takes.
SELECT setval('bench_batch_seq', %(start)s, false);

-- name: pgbench_batch_params
-- pgbench's per-transaction parameters: the next planned batch (batch size 1: record n + 1).
SELECT %(job_id)s AS job_id, %(prefix)s || '-' || lpad(s.n::text, 6, '0') AS batch_id,
       '{' || (s.n + 1) || '}' AS ids, 1 AS dispatch_seq
FROM (SELECT nextval('bench_batch_seq') AS n) s;

-- name: batches_to_processing
-- Put a job's pending batches in the state a claimed worker leaves them (dispatch 1, attempt 1).
UPDATE wave_batches
SET status = 'processing', dispatch_seq = 1, attempts = 1, dispatched_at = clock_timestamp(),
    started_at = clock_timestamp(), heartbeat_at = clock_timestamp(), worker_id = 'bench'
WHERE job_id = %(job_id)s AND status IN ('pending', 'dispatched');

-- name: complete_first_pending
-- Complete the first `n` pending batches of a wave as if their workers had run, recording their
-- row counts as a worker does (derived batches counted as created). Counters follow through the
-- triggers.
UPDATE wave_batches
SET status = 'completed', completed_at = clock_timestamp(), needs_derivation = false,
    derived_created_at = clock_timestamp(), attempts = 1, rows_written = record_count
WHERE id IN (
    SELECT id FROM wave_batches
    WHERE job_id = %(job_id)s AND wave_number = %(wave_number)s AND status = 'pending'
    ORDER BY id LIMIT %(n)s
);

-- name: complete_active
-- Complete every dispatched or processing batch of a wave (frees the parallelism slots), with
-- the row counts a worker records.
UPDATE wave_batches
SET status = 'completed', completed_at = clock_timestamp(), needs_derivation = false,
    derived_created_at = clock_timestamp(), rows_written = record_count
WHERE job_id = %(job_id)s AND wave_number = %(wave_number)s
  AND status IN ('dispatched', 'processing');

-- name: insert_derived_for_completed
-- One derived batch per completed parent batch (what the listener would have created).
INSERT INTO wave_batches
    (job_id, batch_id, wave_number, record_type_id, chunk_ids_json, record_count,
     parent_batch_id)
SELECT b.job_id, 'TransactionLine-' || b.batch_id || '-0000', %(wave_number)s,
       %(record_type_id)s, b.chunk_ids_json, b.record_count, b.batch_id
FROM wave_batches b
WHERE b.job_id = %(job_id)s AND b.wave_number = %(parent_wave)s AND b.status = 'completed'
ON CONFLICT (job_id, batch_id) DO NOTHING;

-- name: derived_reset
-- Undo a derived wave's first dispatch: its batches back to pending, its lag stamp cleared.
UPDATE wave_batches SET status = 'pending', dispatched_at = NULL
WHERE job_id = %(job_id)s AND wave_number = %(wave_number)s AND status = 'dispatched';

-- name: wave_reset_first_dispatch
-- Clear a wave's first-dispatch stamp so the next dispatch is a first dispatch again.
UPDATE wave_coordination SET first_dispatched_at = NULL, dispatch_lag_seconds = NULL
WHERE job_id = %(job_id)s AND wave_number = %(wave_number)s;

-- name: derived_lag
-- The derived wave's dispatch lag as the engine recorded it.
SELECT w.dispatch_lag_seconds FROM wave_coordination w
WHERE w.job_id = %(job_id)s AND w.dependency_level = -2;

-- name: job_status
-- A job's status.
SELECT status FROM import_jobs WHERE job_id = %(job_id)s;

-- name: pgss_reset
-- Forget pg_stat_statements' counts.
SELECT public.pg_stat_statements_reset();

-- name: pgss_calls
-- Statements executed by this database since the last reset (top level and nested), by text.
SELECT toplevel, calls, query FROM public.pg_stat_statements
WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database());

-- name: backend_pid
-- This connection's server process.
SELECT pg_backend_pid() AS pid;

-- name: temp_bytes
-- Bytes written to temporary files by this database so far.
SELECT temp_bytes FROM pg_stat_database WHERE datname = current_database();

-- name: completed_between
-- Completed batches of a job with batch_id in [lo, hi).
SELECT count(*) AS n FROM wave_batches
WHERE job_id = %(job_id)s AND status = 'completed' AND batch_id >= %(lo)s AND batch_id < %(hi)s;

-- name: vacuum_batches
-- Settle the batch table before a timed run.
VACUUM ANALYZE wave_batches;

-- name: vacuum_staging
-- Settle the staging table before a timed run.
VACUUM ANALYZE staging_records;

-- name: checkpoint
-- Flush dirty buffers so a timed run does not pay for the setup's writes.
CHECKPOINT;

-- name: plain_insert_customers
-- Row 6's baseline: the job's customers straight from staging into the (copied) target table.
INSERT INTO customers (id, name, imported_job)
SELECT s.record_id, s.payload ->> 'name', s.job_id FROM staging_records s
WHERE s.job_id = %(job_id)s AND s.record_type_id = -2;

-- name: plain_insert_orders
-- Row 6's baseline: the job's sales orders.
INSERT INTO transactions (id, record_type_id, customer_id, amount, payload, imported_job)
SELECT s.record_id, s.record_type_id, s.parent_id, (s.payload ->> 'amount')::numeric,
       s.payload, s.job_id
FROM staging_records s
WHERE s.job_id = %(job_id)s AND s.record_type_id = -30;

-- name: plain_insert_lines
-- Row 6's baseline: the job's transaction lines.
INSERT INTO transaction_lines (id, transaction_id, amount, payload, imported_job)
SELECT s.record_id, s.parent_id, (s.payload ->> 'amount')::numeric, s.payload, s.job_id
FROM staging_records s
WHERE s.job_id = %(job_id)s AND s.record_type_id = -13;

-- name: wave_dispatch_lags
-- Each wave's dispatch lag as the engine stamped it (first dispatch - when it became ready).
SELECT wave_number, record_type_id, dispatch_lag_seconds
FROM wave_coordination WHERE job_id = %(job_id)s ORDER BY wave_number;

-- name: derived_batch_dispatch_lags
-- Per derived batch: its dispatch minus its parent batch's completion, seconds.
SELECT extract(epoch FROM d.dispatched_at - p.completed_at)::double precision AS lag_s
FROM wave_batches d
JOIN wave_batches p ON p.job_id = d.job_id AND p.batch_id = d.parent_batch_id
WHERE d.job_id = %(job_id)s AND d.record_type_id = %(derived)s
  AND d.dispatched_at IS NOT NULL AND p.completed_at IS NOT NULL;

-- name: pgss_top
-- Where the server's time went since the last reset: the top statements by total execution
-- time (top level and nested), with calls and mean.
SELECT toplevel, calls, round(total_exec_time::numeric, 1) AS total_ms,
       round(mean_exec_time::numeric, 3) AS mean_ms,
       round(total_plan_time::numeric, 1) AS plan_ms, rows,
       left(regexp_replace(query, '\s+', ' ', 'g'), 160) AS query
FROM public.pg_stat_statements
WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())
  AND query NOT LIKE '%%pg_stat_statements%%'
ORDER BY total_exec_time DESC LIMIT %(n)s;

-- name: batch_phases
-- Per record type, from the batch rows: dispatch -> claim (the worker's start) and claim ->
-- completion (the worker's work), in milliseconds.
SELECT record_type_id, count(*) AS batches,
       round((percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM started_at - dispatched_at)) * 1000)::numeric, 1) AS start_p50_ms,
       round((percentile_cont(0.99) WITHIN GROUP (ORDER BY extract(epoch FROM started_at - dispatched_at)) * 1000)::numeric, 1) AS start_p99_ms,
       round((percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM completed_at - started_at)) * 1000)::numeric, 1) AS work_p50_ms,
       round((percentile_cont(0.99) WITHIN GROUP (ORDER BY extract(epoch FROM completed_at - started_at)) * 1000)::numeric, 1) AS work_p99_ms,
       round((sum(extract(epoch FROM completed_at - started_at)))::numeric, 1) AS work_total_s
FROM wave_batches
WHERE job_id = %(job_id)s AND status = 'completed'
GROUP BY record_type_id ORDER BY record_type_id;

-- name: job_span
-- From the job's first batch dispatch to its last completion, seconds (the database's view of
-- an import's working time, without start-up and the last observation).
SELECT round(extract(epoch FROM max(completed_at) - min(dispatched_at))::numeric, 2) AS seconds
FROM wave_batches WHERE job_id = %(job_id)s;

-- name: wave_timeline
-- Per wave, seconds from the job's first dispatch: its first dispatch, its first claim (a
-- worker's start), its last completion; and its batches' work in batch-seconds (the sum of
-- claim -> completion). Where a pod start or a dependency leaves the cores idle shows as a gap
-- between one wave's last completion and the next one's first claim.
WITH t0 AS (SELECT min(dispatched_at) AS at FROM wave_batches WHERE job_id = %(job_id)s)
SELECT wave_number, count(*) AS batches,
       round(extract(epoch FROM min(dispatched_at) - t0.at)::numeric, 2) AS first_dispatch_s,
       round(extract(epoch FROM min(started_at) - t0.at)::numeric, 2) AS first_claim_s,
       round(extract(epoch FROM max(completed_at) - t0.at)::numeric, 2) AS last_completion_s,
       round(sum(extract(epoch FROM completed_at - started_at))::numeric, 1) AS work_s
FROM wave_batches, t0
WHERE job_id = %(job_id)s
GROUP BY wave_number, t0.at ORDER BY wave_number;

-- name: busy_profile
-- Batches in a worker's hands (claimed, not yet completed), on average, per second of the
-- job's span from its first dispatch: the parallelism the import actually had over time.
WITH t0 AS (SELECT min(dispatched_at) AS at FROM wave_batches WHERE job_id = %(job_id)s),
secs AS (
  SELECT generate_series(0, ceil(extract(epoch FROM max(completed_at) - min(t0.at)))::int - 1) AS s
  FROM wave_batches, t0 WHERE job_id = %(job_id)s
)
SELECT secs.s,
       -- FILTER: a second with no batch joins one row of NULLs, which least()/greatest()
       -- would skip, counting the whole second as busy
       round(coalesce(sum(greatest(0, extract(epoch FROM
         least(b.completed_at, t0.at + make_interval(secs => secs.s + 1))
         - greatest(b.started_at, t0.at + make_interval(secs => secs.s)))))
         FILTER (WHERE b.id IS NOT NULL), 0)::numeric, 2) AS busy
FROM secs CROSS JOIN t0
LEFT JOIN wave_batches b ON b.job_id = %(job_id)s AND b.started_at IS NOT NULL
  AND b.started_at < t0.at + make_interval(secs => secs.s + 1)
  AND b.completed_at > t0.at + make_interval(secs => secs.s)
GROUP BY secs.s ORDER BY secs.s;
