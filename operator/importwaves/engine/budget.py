"""The operator-wide worker budget and its fair share: a pure function (issue 16).

`spec.parallelism` bounds one import; the budget bounds all of them together: at most `total`
batches dispatched or running at once across every import an operator (or one local runner)
drives, and at most `per_tenant` for any one tenant. Within the budget, free slots go to the
tenant that holds the fewest slots for its weight (weighted max-min fairness, filled one slot at
a time), then within that tenant to its import holding the fewest for its priority. A tenant with
a 100,000-batch backlog therefore cannot keep a small tenant waiting: every slot the big one
frees goes to whoever holds the least for its weight.

Nothing is preempted: a running batch keeps its slot. An import that already holds more than
its share gets nothing new until others have caught up. Among tenants holding as much for their
weight, the one whose turn came longest ago goes first (`turns`: a round-robin order the caller
keeps, a tenant going to the back each time one of its imports is served); among a tenant's
imports holding as much for their priority, the one that came first (`Demand.arrival`), so a
tenant's imports finish in order instead of all advancing in lock-step. Then by tenant name and
job id: the same inputs always give the same grants (the function is deterministic and total).
Names alone must not decide: with 200 tenants holding one slot or none each, ties broken by name
gave every freed slot to the first names in the alphabet, and one import waited 32 minutes for a
slot that others got within seconds (the many-tenants bench, 1,000 imports, budget 16).
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction


@dataclass(frozen=True)
class Budget:
    #: batches dispatched or running at once across all imports; 0 means unlimited
    total: int = 0
    #: batches at once for one tenant; 0 means no per-tenant cap
    per_tenant: int = 0

    def __post_init__(self) -> None:
        if self.total < 0 or self.per_tenant < 0:
            raise ValueError("budget limits must be >= 0 (0 means unlimited)")


@dataclass(frozen=True)
class Demand:
    """One import as the budget sees it."""

    tenant: str
    job_id: str
    #: batches of this import dispatched or running now (they hold slots)
    active: int
    #: batches it could dispatch now if the budget allowed (pending and dispatchable, already
    #: bounded by its own parallelism minus `active`)
    wanted: int
    #: relative weight of the import within its tenant, and of the tenant (the largest priority
    #: among its imports): `spec.priority`, default 1
    priority: int = 1
    #: when it first asked for a slot, as an order (lower: earlier; first among its tenant's
    #: imports holding as much)
    arrival: int = 0

    def __post_init__(self) -> None:
        if self.active < 0 or self.wanted < 0 or self.arrival < 0:
            raise ValueError("active, wanted and arrival must be >= 0")
        if self.priority < 1:
            raise ValueError("priority must be >= 1")


@dataclass(frozen=True)
class Grant:
    tenant: str
    job_id: str
    #: batches this import may dispatch now
    granted: int
    #: batches it wanted but may not dispatch now because of the budget (WaitingForCapacity)
    held: int

    @property
    def waiting(self) -> bool:
        return self.held > 0


def share(
    budget: Budget, demands: Sequence[Demand], turns: Mapping[str, int] | None = None
) -> dict[str, Grant]:
    """Grants by job id. Never more than `wanted` for any import; never more dispatched or
    running in total than `budget.total`, nor per tenant than `budget.per_tenant` (a total or a
    tenant already over its limit, e.g. after the limit was lowered, gets nothing new).
    `turns`: each tenant's place in the round-robin (lower first among tenants holding as much
    for their weight; a tenant not in it: 0)."""
    ids = [d.job_id for d in demands]
    if len(set(ids)) != len(ids):
        raise ValueError("one demand per job id")
    granted = {d.job_id: 0 for d in demands}
    by_tenant: dict[str, list[Demand]] = {}
    for d in demands:
        by_tenant.setdefault(d.tenant, []).append(d)

    held_total = sum(d.active for d in demands)
    free = budget.total - held_total if budget.total else sum(d.wanted for d in demands)
    tenant_room = {
        t: _room(budget.per_tenant, sum(d.active for d in ds), sum(d.wanted for d in ds))
        for t, ds in by_tenant.items()
    }
    weight = {t: max(d.priority for d in ds) for t, ds in by_tenant.items()}
    holding = {t: sum(d.active for d in ds) for t, ds in by_tenant.items()}
    turn = {t: (turns or {}).get(t, 0) for t in by_tenant}

    # Tenants by (slots held / weight, turn, name): the least served first, one slot at a time.
    heap = [(Fraction(holding[t], weight[t]), turn[t], t) for t in by_tenant if tenant_room[t] > 0]
    heapq.heapify(heap)
    job_heaps = {t: _job_heap(ds) for t, ds in by_tenant.items()}
    left = {d.job_id: d.wanted for d in demands}
    while free > 0 and heap:
        _, _, t = heapq.heappop(heap)
        job = _next_job(job_heaps[t], left, granted)
        if job is None:
            continue  # nothing left this tenant can use
        granted[job] += 1
        left[job] -= 1
        free -= 1
        holding[t] += 1
        tenant_room[t] -= 1
        if tenant_room[t] > 0:
            heapq.heappush(heap, (Fraction(holding[t], weight[t]), turn[t], t))
    return {
        d.job_id: Grant(d.tenant, d.job_id, granted[d.job_id], d.wanted - granted[d.job_id])
        for d in demands
    }


def _room(cap: int, active: int, wanted: int) -> int:
    """Slots a tenant may still take: its wanted, bounded by its cap minus what it holds."""
    return wanted if not cap else max(0, min(wanted, cap - active))


#: a job heap entry: (slots held / priority, arrival, job id, priority, slots held)
_JobEntry = tuple[Fraction, int, str, int, int]


def _job_heap(demands: Iterable[Demand]) -> list[_JobEntry]:
    heap = [
        (Fraction(d.active, d.priority), d.arrival, d.job_id, d.priority, d.active) for d in demands
    ]
    heapq.heapify(heap)
    return heap


def _next_job(heap: list[_JobEntry], left: dict[str, int], granted: dict[str, int]) -> str | None:
    """The tenant's import holding the fewest slots for its priority that still wants one;
    imports that want nothing more leave the heap."""
    while heap:
        _, arrival, job, prio, held = heapq.heappop(heap)
        if left[job] <= 0:
            continue
        heapq.heappush(heap, (Fraction(held + 1, prio), arrival, job, prio, held + 1))
        return job
    return None


def waiting_message(grant: Grant, budget: Budget) -> str:
    """The Progressing message of an import held back by the budget."""
    limits = []
    if budget.total:
        limits.append(f"the operator-wide budget of {budget.total} batch(es)")
    if budget.per_tenant:
        limits.append(f"the per-tenant cap of {budget.per_tenant}")
    by = " and ".join(limits) or "the budget"
    return (
        f"waiting for capacity: {grant.held} batch(es) ready but held back by {by} "
        f"(shared fairly among tenants)"
    )
