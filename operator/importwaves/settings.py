"""Operator settings from the environment (one typed object, loaded at startup)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from importwaves.db.options import ConnOptions


def _random_priority() -> int:
    import secrets

    return 1 + secrets.randbelow(1_000_000)


def _env(name: str, default: str) -> str:
    return os.environ.get(f"IMPORTWAVES_{name}", default)


@dataclass(frozen=True)
class Settings:
    #: Redis URL for fast-path flags; empty runs cache-less (the DB answers every read).
    redis_url: str | None = field(default_factory=lambda: _env("REDIS_URL", "") or None)
    #: Seconds between level-based reconciles of every ImportJob (timer).
    timer_interval: float = field(default_factory=lambda: float(_env("TIMER_INTERVAL", "10")))
    #: Port of the Prometheus /metrics endpoint (0 disables it).
    metrics_port: int = field(default_factory=lambda: int(_env("METRICS_PORT", "9090")))
    #: Liveness endpoint URL served by kopf.
    liveness: str = field(default_factory=lambda: _env("LIVENESS", "http://0.0.0.0:8080/healthz"))
    #: Namespaces to watch (comma-separated); empty watches the whole cluster.
    namespaces: tuple[str, ...] = field(
        default_factory=lambda: tuple(
            n.strip() for n in _env("NAMESPACES", "").split(",") if n.strip()
        )
    )
    #: kopf peering object name (one active operator at a time); empty disables peering.
    peering: str = field(default_factory=lambda: _env("PEERING", "importwaves"))
    #: This operator's peering priority: the highest live one works, the others wait. Unset, it
    #: is random, because operators with EQUAL priorities all pause (kopf's peering rule).
    priority: int = field(default_factory=lambda: int(_env("PRIORITY", "") or _random_priority()))
    #: Connections per tenant database pool.
    pool_size: int = field(default_factory=lambda: int(_env("POOL_SIZE", "4")))
    #: Most batches dispatched or running at once across every ImportJob (0: no budget).
    budget_total: int = field(default_factory=lambda: int(_env("BUDGET_TOTAL", "0")))
    #: Most batches at once for one tenant within the budget (0: no per-tenant cap).
    budget_per_tenant: int = field(default_factory=lambda: int(_env("BUDGET_PER_TENANT", "0")))
    #: TTL of the Redis flags in seconds (the seed's 7200).
    flag_ttl: int = field(default_factory=lambda: int(_env("FLAG_TTL", "7200")))
    #: Longest back-off between retries of an ImportJob whose database or Secret is unavailable.
    max_backoff: float = field(default_factory=lambda: float(_env("MAX_BACKOFF", "60")))
    #: Timeouts and TCP keepalives of every tenant connection (IMPORTWAVES_CONNECT_TIMEOUT,
    #: _STATEMENT_TIMEOUT_MS, _LOCK_TIMEOUT_MS, _IDLE_IN_TRANSACTION_TIMEOUT_MS, _KEEPALIVES_IDLE,
    #: _KEEPALIVES_INTERVAL, _KEEPALIVES_COUNT, _TCP_USER_TIMEOUT_MS; defaults in db/options.py).
    conn: ConnOptions = field(default_factory=ConnOptions.from_env)

    #: activeDeadlineSeconds of worker Jobs when the ImportJob sets no
    #: spec.worker.activeDeadlineSeconds (0 = none).
    worker_active_deadline: int = field(
        default_factory=lambda: int(_env("WORKER_ACTIVE_DEADLINE_SECONDS", "3600"))
    )
    #: Seconds a pooled worker pod waits with nothing to claim before it exits 0: given to
    #: every worker pod as IMPORTWAVES_WORKER_IDLE_SECONDS (spec.worker.env cannot set it).
    worker_idle_seconds: float = field(
        default_factory=lambda: float(_env("WORKER_IDLE_SECONDS", "30"))
    )
    #: Seconds the last failed worker Job of a wave is kept for `kubectl logs` (0: not kept).
    keep_failed_job_seconds: int = field(
        default_factory=lambda: int(_env("KEEP_FAILED_JOB_SECONDS", "3600"))
    )

    def __post_init__(self) -> None:
        if not self.worker_idle_seconds > 0:  # also NaN
            raise ValueError(
                "IMPORTWAVES_WORKER_IDLE_SECONDS must be a number of seconds above 0, got "
                f"{self.worker_idle_seconds!r}"
            )
