"""Prometheus metrics for the seed design's signals.

| seed name                    | Prometheus name                                  |
|------------------------------|--------------------------------------------------|
| wave.stuck_detection.count   | importwaves_wave_stuck_detection_total (counter) |
| queue.active_jobs.count      | importwaves_queue_active_jobs (gauge)            |
| wave.dispatch_lag.seconds    | importwaves_wave_dispatch_lag_seconds (histogram)|
| derived backlog indicator    | importwaves_derived_backlog_batches (gauge)      |
| rows imported (issue 11)     | importwaves_rows_imported_total (counter)        |
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, start_http_server

STUCK_DETECTED = Counter(
    "importwaves_wave_stuck_detection",
    "Batches found stuck (stale processing or unclaimed dispatch) and requeued or failed "
    "(seed: wave.stuck_detection.count).",
    ["tenant", "kind"],
)
ACTIVE_JOBS = Gauge(
    "importwaves_queue_active_jobs",
    "Import jobs currently running (seed: queue.active_jobs.count).",
    ["tenant"],
)
DISPATCH_LAG = Histogram(
    "importwaves_wave_dispatch_lag_seconds",
    "Time from a wave becoming dispatchable (previous wave or parent threshold committed) to its "
    "first dispatch (seed: wave.dispatch_lag.seconds).",
    ["tenant", "level"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
)
DERIVED_BACKLOG = Gauge(
    "importwaves_derived_backlog_batches",
    "Derived (-13) batches pending, dispatched or processing in running jobs.",
    ["tenant"],
)
DISPATCHED = Counter(
    "importwaves_batches_dispatched",
    "Batches handed to workers.",
    ["tenant", "level"],
)
COMPLETIONS = Counter(
    "importwaves_batch_completions",
    "Batch completions handled by the listener.",
    ["tenant"],
)
GUARD_DECISIONS = Counter(
    "importwaves_completion_guard_decisions",
    "Coordinator runs that found the main waves done, by outcome.",
    ["tenant", "outcome"],
)
ROWS_IMPORTED = Counter(
    "importwaves_rows_imported",
    "Rows imported by completed imports, per record type (the row counts their workers recorded "
    "in their completion transactions; counted once, when the import completes).",
    ["tenant", "record_type"],
)
CACHE_FALLBACKS = Counter(
    "importwaves_cache_fallbacks",
    "Reads that fell back to the database because Redis had no answer.",
    ["tenant", "key"],
)


def serve(port: int, addr: str = "0.0.0.0") -> None:  # noqa: S104 - metrics are meant to be scraped
    """Expose /metrics on `addr:port` from a background thread."""
    start_http_server(port, addr)
