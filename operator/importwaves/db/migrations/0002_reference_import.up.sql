-- The reference import: a staging table the import reads and the target tables it writes.
-- Foreign keys make "children before parents" impossible to hide.

CREATE TABLE staging_records (
    job_id          text NOT NULL,
    record_type_id  integer NOT NULL,
    record_id       bigint NOT NULL,
    parent_id       bigint,
    payload         jsonb NOT NULL DEFAULT '{}'::jsonb,
    PRIMARY KEY (job_id, record_type_id, record_id)
);
CREATE INDEX staging_records_parent ON staging_records (job_id, record_type_id, parent_id);

CREATE TABLE customers (
    id            bigint PRIMARY KEY,
    name          text NOT NULL,
    imported_job  text NOT NULL,
    imported_at   timestamptz NOT NULL DEFAULT clock_timestamp()
);

CREATE TABLE transactions (
    id              bigint PRIMARY KEY,
    record_type_id  integer NOT NULL,
    customer_id     bigint REFERENCES customers (id),
    amount          numeric(14, 2) NOT NULL,
    payload         jsonb NOT NULL,
    imported_job    text NOT NULL,
    imported_at     timestamptz NOT NULL DEFAULT clock_timestamp()
);

CREATE TABLE transaction_lines (
    id              bigint PRIMARY KEY,
    transaction_id  bigint NOT NULL REFERENCES transactions (id),
    amount          numeric(14, 2) NOT NULL,
    payload         jsonb NOT NULL,
    imported_job    text NOT NULL,
    imported_at     timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX transaction_lines_transaction ON transaction_lines (transaction_id);
