-- Where a job's workers run (launch/port.py LaunchTarget as JSON), stored with the job when it
-- is submitted: the engine reads it back for every worker sync, so no launcher keeps a
-- job -> owner dict (two ImportJobs with the same importId in two namespaces are two targets).
ALTER TABLE import_jobs ADD COLUMN launch_target jsonb;

-- Pooled workers claim "the next dispatched batch of the job (of one wave)" with SKIP LOCKED.
CREATE INDEX wave_batches_claimable ON wave_batches (job_id, wave_number, id)
    WHERE status = 'dispatched' AND worker_id IS NULL;
