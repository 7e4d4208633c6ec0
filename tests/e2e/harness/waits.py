"""Polling helpers for the e2e tests."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


def wait_for(
    fn: Callable[[], T | None], timeout: float = 60, interval: float = 0.25, what: str = ""
) -> T:
    """Call `fn` until it returns something truthy; return it, or fail after `timeout`."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        last = fn()
        if last:
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or fn}")
        time.sleep(interval)


def job_condition(job: Any) -> str | None:
    """'Complete' or 'Failed' once the Job has that condition set to True, else None."""
    for c in (job.status.conditions or []) if job.status else []:
        if c.type in ("Complete", "Failed") and c.status == "True":
            return str(c.type)
    return None


def wait_job_finished(batch: Any, namespace: str, name: str, timeout: float = 90) -> Any:
    """Wait until Job `name` is Complete or Failed; return the Job."""

    def done() -> Any:
        job = batch.read_namespaced_job(name, namespace)
        return job if job_condition(job) else None

    return wait_for(done, timeout, what=f"job {namespace}/{name} to finish")
