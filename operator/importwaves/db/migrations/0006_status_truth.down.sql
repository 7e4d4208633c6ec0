-- Cancelled jobs become suspended (nothing dispatches them until resumed); the refusal and the
-- retry back-off are dropped (batches become dispatchable at once).
UPDATE import_jobs SET status = 'suspended' WHERE status = 'cancelled';
ALTER TABLE import_jobs DROP CONSTRAINT import_jobs_status_check;
ALTER TABLE import_jobs ADD CONSTRAINT import_jobs_status_check
    CHECK (status IN ('running', 'completed', 'failed', 'suspended', 'invalid'));
ALTER TABLE import_jobs DROP COLUMN refusal;
ALTER TABLE import_jobs DROP COLUMN refused_spec;
ALTER TABLE import_jobs DROP COLUMN spec_uid;
ALTER TABLE import_jobs DROP COLUMN spec_generation;

ALTER TABLE wave_batches DROP COLUMN retry_after;
