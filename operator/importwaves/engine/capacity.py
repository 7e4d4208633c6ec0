"""The ledger of batch slots shared by every import one process drives (issue 16).

One `CapacityKeeper` per operator (or per local run of several imports) holds each import's
latest report: the batches it holds (dispatched or running, read under its job lock by its
coordinator run) and the batches it could dispatch now. A coordinator run reports, gets its
grant from the pure fair share (engine/budget.py) over every import's latest report, and
dispatches at most that. The lock guards a dictionary and a pure computation, never I/O.

When a report shows slots freed while other imports wait, those imports are nudged (their
coordinator run is scheduled through `nudge`, off the reporting run's thread): the slot goes to
whoever holds the least for its weight, not to the import that happened to free it. At most one
nudge per import waits to run (a nudge is a prompt to look again, and one look sees every slot
freed before it starts): without that, every report that freed a slot queued one more run per
waiting import, faster than the keeper's two threads ran them (the many-tenants bench: 43,000
queued nudges, ~35 MB, still queued after every import had finished).
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from importwaves.engine.budget import Budget, Demand, Grant, share
from importwaves.log import event

log = logging.getLogger("importwaves.capacity")

#: runs one import's coordinator again (called on the keeper's own threads)
Nudge = Callable[[], None]


class CapacityKeeper:
    def __init__(self, budget: Budget) -> None:
        self.budget = budget
        self._lock = threading.Lock()
        self._reports: dict[str, Demand] = {}
        self._held: dict[str, int] = {}
        self._nudges: dict[str, Nudge] = {}
        #: imports with a nudge queued and not started yet (at most one each)
        self._queued: set[str] = set()
        #: the fair share's tie-breaks (engine/budget.py): each import's arrival, and each
        #: tenant's turn in the round-robin (to the back each time one of its imports is served)
        self._arrival: dict[str, int] = {}
        self._turns: dict[str, int] = {}
        self._order = itertools.count(1)
        #: nudges run here, never on the thread of the run that reported (it holds a job lock)
        self._executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="capacity")

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    def grant(
        self,
        tenant: str,
        job_id: str,
        *,
        active: int,
        wanted: int,
        priority: int = 1,
        nudge: Nudge | None = None,
    ) -> Grant:
        """This import holds `active` slots and could dispatch `wanted` more: how many it may."""
        with self._lock:
            if nudge is not None:
                self._nudges[job_id] = nudge
            before = self._reports.get(job_id)
            arrival = self._arrival.setdefault(job_id, next(self._order))
            self._turns.setdefault(tenant, next(self._order))
            self._reports[job_id] = Demand(tenant, job_id, active, wanted, priority, arrival)
            grants = share(self.budget, list(self._reports.values()), self._turns)
            mine = grants[job_id]
            if mine.granted:
                self._turns[tenant] = next(self._order)  # served: to the back of the line
            # the granted slots are held from now on (the run dispatches them in its
            # transaction; its next report reads them back from the database)
            self._reports[job_id] = Demand(
                tenant, job_id, active + mine.granted, mine.held, priority, arrival
            )
            self._held[job_id] = mine.held
            freed = before is not None and active < before.active
            wake = (
                [
                    j
                    for j, g in grants.items()
                    if j != job_id and g.granted > 0 and self._held.get(j) and j in self._nudges
                ]
                if freed or mine.held == 0
                else []
            )
        if mine.held:
            event(
                log,
                "capacity_held",
                logging.DEBUG,
                job_id=job_id,
                tenant=tenant,
                granted=mine.granted,
                held=mine.held,
            )
        self._wake(wake)
        return mine

    def forget(self, job_id: str) -> None:
        """The import is finished (or gone): its slots are free; wake whoever waits."""
        with self._lock:
            gone = self._reports.pop(job_id, None)
            self._held.pop(job_id, None)
            self._arrival.pop(job_id, None)
            if gone is not None and all(d.tenant != gone.tenant for d in self._reports.values()):
                self._turns.pop(gone.tenant, None)
            self._nudges.pop(job_id, None)
            wake = (
                [j for j, h in self._held.items() if h and j in self._nudges]
                if gone is not None and gone.active
                else []
            )
        self._wake(wake)

    def _wake(self, job_ids: list[str]) -> None:
        """Queue a nudge for each of these imports that has none queued yet."""
        for j in job_ids:
            with self._lock:
                if j in self._queued:
                    continue
                self._queued.add(j)
            try:
                self._executor.submit(self._run_nudge, j)
            except RuntimeError:  # shut down
                return

    def _run_nudge(self, job_id: str) -> None:
        """Run the import's latest nudge (the engine that reported last), unless it has been
        forgotten meanwhile (finished or deleted: nothing to look at)."""
        with self._lock:
            self._queued.discard(job_id)
            nudge = self._nudges.get(job_id)
        if nudge is not None:
            nudge()

    def queued(self) -> int:
        """Nudges queued and not started (for tests)."""
        with self._lock:
            return len(self._queued)

    def held(self, job_id: str) -> int:
        """Batches of this import ready but held back by the budget at its last run."""
        with self._lock:
            return self._held.get(job_id, 0)

    def holding(self) -> dict[str, int]:
        """Slots held per tenant, as last reported (for metrics and tests)."""
        with self._lock:
            out: dict[str, int] = {}
            for d in self._reports.values():
                out[d.tenant] = out.get(d.tenant, 0) + d.active
            return out
