-- One status truth (issue 13).
--
-- import_jobs.status gets `cancelled`: the ImportJob was deleted; its dispatched and processing
-- batches were released to pending (their data kept) and nothing is dispatched until the same
-- import is submitted again (a re-applied ImportJob), which reopens it.
-- import_jobs.refusal / refused_spec: the last spec change the engine refused (SpecChangeRefused)
-- and the spec that was refused, recorded durably so every path that writes the ImportJob's
-- status (the reconcile, a Job event, a NOTIFY prompt) derives the same Invalid condition from
-- the database; cleared when a submitted spec is accepted again.
-- import_jobs.spec_uid / spec_generation: the ImportJob (uid) and the generation of the last spec
-- submitted to the job (applied or refused): a reconcile still running with an older generation
-- of the same ImportJob (a timer that started before an edit) is stale and changes nothing, so
-- it can neither clear a newer refusal nor re-apply an older spec.
-- wave_batches.retry_after: a failed attempt's batch is not dispatched again before this time
-- (exponential back-off, spec.retryBackoff); NULL: dispatchable now.

ALTER TABLE import_jobs DROP CONSTRAINT import_jobs_status_check;
ALTER TABLE import_jobs ADD CONSTRAINT import_jobs_status_check
    CHECK (status IN ('running', 'completed', 'failed', 'suspended', 'invalid', 'cancelled'));
ALTER TABLE import_jobs ADD COLUMN refusal text NOT NULL DEFAULT '';
ALTER TABLE import_jobs ADD COLUMN refused_spec jsonb;
ALTER TABLE import_jobs ADD COLUMN spec_uid text;
ALTER TABLE import_jobs ADD COLUMN spec_generation bigint;

ALTER TABLE wave_batches ADD COLUMN retry_after timestamptz;
