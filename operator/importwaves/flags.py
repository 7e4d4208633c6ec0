"""Redis fast-path flags with TTLs. Redis is never the truth and never blocks progress.

Keys (namespaced by tenant and job, so two tenants with the same job id never collide):
    importwaves:{tenant}:{job}:wave_monitoring_active    "1", TTL 7200 s
    importwaves:{tenant}:{job}:derived_lines_ready        "1", TTL 7200 s

Parent ids are not cached: a parent batch's ids live in its row (wave_batches.chunk_ids_json, NOT
NULL), and the statement that creates its derived batches reads them there, in the same round
trip (the seed prefers the DB-stored ids; a cache read would only add a round trip and a way to
be wrong).

Every read answers True/False/None; None means "unknown" (key missing, Redis down or not
configured) and the caller falls back to the database. When Redis fails, calls skip it for a short
back-off instead of waiting on a dead socket each time, and the fallback is logged once per outage.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import redis

from importwaves import metrics
from importwaves.log import event

log = logging.getLogger("importwaves.flags")

DEFAULT_TTL = 7200
MONITORING = "wave_monitoring_active"
DERIVED_READY = "derived_lines_ready"


def key(tenant: str, job_id: str, name: str) -> str:
    return f"importwaves:{tenant}:{job_id}:{name}"


class Flags:
    """Monitoring / derived-ready flags for one tenant."""

    def __init__(
        self,
        url: str | None,
        tenant: str,
        *,
        ttl: int = DEFAULT_TTL,
        timeout: float = 0.5,
        backoff: float = 2.0,
    ) -> None:
        if ttl <= 0:  # EXPIRE 0 deletes the key (celery#6373); never let that happen
            raise ValueError("flag TTL must be positive")
        self.tenant = tenant
        self.ttl = ttl
        self.url = url
        self._backoff = backoff
        self._down_until = 0.0
        self._lock = threading.Lock()
        self._outage_logged = False
        self._client: redis.Redis | None = (
            redis.Redis.from_url(
                url,
                socket_timeout=timeout,
                socket_connect_timeout=timeout,
                retry_on_timeout=False,
                decode_responses=True,
            )
            if url
            else None
        )

    @property
    def enabled(self) -> bool:
        return self._client is not None

    # -- flags ---------------------------------------------------------------------------------
    def set_monitoring(self, job_id: str) -> None:
        self._call("set", key(self.tenant, job_id, MONITORING), "1", ex=self.ttl)

    def clear_monitoring(self, job_id: str) -> None:
        self._call("delete", key(self.tenant, job_id, MONITORING))

    def monitoring(self, job_id: str) -> bool | None:
        return self._flag(job_id, MONITORING)

    def set_derived_ready(self, job_id: str) -> None:
        self._call("set", key(self.tenant, job_id, DERIVED_READY), "1", ex=self.ttl)

    def clear_derived_ready(self, job_id: str) -> None:
        self._call("delete", key(self.tenant, job_id, DERIVED_READY))

    def derived_ready(self, job_id: str) -> bool | None:
        return self._flag(job_id, DERIVED_READY)

    def ttl_of(self, job_id: str, name: str) -> int | None:
        """Remaining TTL in seconds; None when the key is missing or Redis is unavailable."""
        ttl = self._call("ttl", key(self.tenant, job_id, name))
        return int(ttl) if isinstance(ttl, int) and ttl >= 0 else None

    def ping(self) -> bool:
        """True when Redis answers now (ignores the back-off)."""
        if self._client is None:
            return False
        try:
            return bool(self._client.ping())
        except redis.RedisError:
            return False

    def forget_job(self, job_id: str) -> None:
        """Drop every key of a job (used when its import is deleted)."""
        if not self._client or not self._usable():
            return
        try:
            keys = list(self._client.scan_iter(match=key(self.tenant, job_id, "*"), count=500))
            if keys:
                self._client.delete(*keys)
        except redis.RedisError as exc:
            self._failed(exc)

    # -- internals -----------------------------------------------------------------------------
    def _flag(self, job_id: str, name: str) -> bool | None:
        value = self._call("get", key(self.tenant, job_id, name))
        if value is None:
            metrics.CACHE_FALLBACKS.labels(self.tenant, name).inc()
            return None
        return bool(value == "1")

    def _usable(self) -> bool:
        return time.monotonic() >= self._down_until

    def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        if self._client is None or not self._usable():
            return None
        try:
            result = getattr(self._client, method)(*args, **kwargs)
        except redis.RedisError as exc:
            self._failed(exc)
            return None
        self._recovered()
        return result

    def _failed(self, exc: Exception) -> None:
        with self._lock:
            self._down_until = time.monotonic() + self._backoff
            first = not self._outage_logged
            self._outage_logged = True
        if first:
            event(
                log,
                "cache_unavailable_fallback_to_db",
                logging.WARNING,
                tenant=self.tenant,
                error=f"{type(exc).__name__}: {exc}",
            )

    def _recovered(self) -> None:
        if self._outage_logged:
            with self._lock:
                was = self._outage_logged
                self._outage_logged = False
            if was:
                event(log, "cache_available_again", tenant=self.tenant)
