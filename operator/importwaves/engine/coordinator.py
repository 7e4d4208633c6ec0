"""`check_and_trigger_next_wave`: the one loop every stimulus ends in.

Lock the job row, read one snapshot, catch up on derived creation, ask `decide`, apply its
answer in the same transaction (dispatch, job status, and a NOTIFY on the tenant's channel that
prompts the job's pooled workers to claim), commit; only then touch the outside world (the
engine's worker sync first, `on_dispatched`, then cache flags and events). Running it twice in a
row does nothing the second time. The coordinator launches nothing itself: a dispatch makes
batches claimable; workers are the business of Engine.sync_workers.

Derived creation (seed A, level-based: every completed parent batch still without its derived
batches) is part of the run: created, then decided on, under the same lock, in one transaction.
Two exceptions keep it off the path the derived dispatch lag measures (`decide.derivation`, a
pure function of the snapshot read before creating): when that snapshot already lets the run
dispatch derived batches (the parents just crossed the threshold and earlier parents' derived
batches are pending), the run dispatches those and commits first, and a second run, right after
it in the same call, creates the rest and decides on them; and while the gate is closed but its
last parent batches may all be running (and enough derived batches are pending to fill the
slots), a run leaves the creation to the run that sees the threshold crossed, so that run never
waits on the job lock behind another's creation. An open gate's derived batches are
dispatchable in any order, and the completion guard counts the parents still awaiting
derivation, so nothing completes before they are created.

A run's transaction is two round trips when it neither plans nor creates: BEGIN, the job lock
and the snapshot in one, the decision's writes and COMMIT in the other (`db/pipelined.py`).

A caller may hand the run a `prepare` step (its statements sent in the run's first round trip,
after the job lock, before the snapshot, with the spec the job had at this coordinator's last
run: if the locked row says otherwise, or the job is not planned, the run rolls back and is
made again with the row's spec) and an `on_commit` step (run after the commit, right
after the worker sync; after the second run when creation was deferred): the batch-completed
listener reads the batches it was told of (and counts an exit without completion), and logs
`derived_initialized`, that way.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from importwaves import metrics
from importwaves.db.connect import Conn
from importwaves.db.pipelined import PipelinedTransaction, pipelined_transaction
from importwaves.db.pools import TenantPool
from importwaves.db.queries import Q
from importwaves.engine import derived
from importwaves.engine.budget import waiting_message
from importwaves.engine.capacity import CapacityKeeper
from importwaves.engine.decide import Derivation, decide, derivation
from importwaves.engine.events import DerivedWavesCreated, EventBus
from importwaves.engine.jobrow import spec_of
from importwaves.engine.model import Decision, JobStatus, Outcome, Snapshot, WaveState
from importwaves.engine.notify import channel_for, prompt_payload
from importwaves.engine.planner import plan
from importwaves.engine.rows import Code, TypeRows, completion_problems
from importwaves.engine.snapshot import read_snapshot, send_snapshot, send_snapshot_of
from importwaves.flags import Flags
from importwaves.launch.base import BatchDispatch
from importwaves.log import event
from importwaves.spec import ImportSpec

log = logging.getLogger("importwaves.coordinator")


@dataclass
class RunResult:
    """What one coordinator run did."""

    job_id: str
    outcome: Outcome
    reason: str = ""
    dispatched: list[BatchDispatch] = field(default_factory=list)
    derived_created: int = 0
    #: derived creation was left to a second run, after this run's dispatch committed
    derivation_deferred: bool = False
    snapshot: Snapshot | None = None
    decision: Decision | None = None
    #: batches this run could have dispatched but the operator-wide budget held back
    held: int = 0
    seconds: float = 0.0


#: Outcomes after which a job holds no slot of the shared budget.
TERMINAL_OUTCOMES = frozenset(
    {Outcome.COMPLETED, Outcome.FAILED, Outcome.INVALID, Outcome.NOT_FOUND}
)

#: A step run inside the coordinator's transaction, under the job lock: it sends its statements
#: in the run's pipeline (after the job lock's, before the snapshot's, in the same round trip; it
#: must not open a pipeline of its own) and returns the step that reads their replies, called
#: before the snapshot is read. It may be sent, and its statements rolled back, twice in a run
#: (see the module docstring).
Prepare = Callable[[Conn, ImportSpec], Callable[[], None]]
#: A step run after the commit, right after the worker sync, before the run's flags and events.
OnCommit = Callable[[RunResult], None]
#: What the engine does with a run's dispatched batches after its commit (its worker sync);
#: called with the keyword `snapshot_waves`: the run's snapshot's waves, read before it.
OnDispatched = Callable[..., None]


class _StaleSpec(Exception):
    """A run's guess of the job's spec (its `prepare` sent with it) was wrong: roll back, redo."""


def _guess_holds(job: dict[str, Any], known: tuple[dict[str, Any], ImportSpec] | None) -> bool:
    """Whether a `prepare` sent with the spec `known` before the job's row was read ran as it
    would have after it: the job has that spec and is planned. (A run that finds the job gone
    or cancelled rolls back whatever it sent.)"""
    return known is not None and job["spec"] == known[0] and job["planned_at"] is not None


class GuardViolation(RuntimeError):
    """The counters said "complete" but the batch rows disagree (never expected)."""


class Coordinator:
    def __init__(
        self,
        tenant: str,
        pool: TenantPool,
        flags: Flags,
        bus: EventBus,
    ) -> None:
        self.tenant = tenant
        self.pool = pool
        self.flags = flags
        self.bus = bus
        #: the slots shared with every other import this process drives (None: no budget)
        self.capacity: CapacityKeeper | None = None
        #: called after the commit of a run that dispatched (the engine: sync the job's workers)
        self.on_dispatched: OnDispatched | None = None
        #: per job, its spec as last read under the job lock (the row's JSON, parsed): parsed
        #: once, not per run, and what a run's `prepare` is sent with before the row is read
        self._specs: dict[str, tuple[dict[str, Any], ImportSpec]] = {}

    def _spec_of(self, job_id: str, job: dict[str, Any]) -> ImportSpec:
        known = self._specs.get(job_id)
        if known is not None and known[0] == job["spec"]:
            return known[1]
        spec = spec_of(job)
        self._specs[job_id] = (job["spec"], spec)
        return spec

    def check_and_trigger_next_wave(
        self,
        job_id: str,
        cause: str = "nudge",
        *,
        prepare: Prepare | None = None,
        on_commit: OnCommit | None = None,
        source: str = "coordinator",
        defer_derivation: bool = True,
    ) -> RunResult:
        """One run (two when derived creation is deferred: see the module docstring; the result
        is the first run's, with the second's dispatches and created batches added).
        `prepare`/`on_commit`: see the module docstring; `source` names who created derived
        batches in this run, for the DerivedWavesCreated event."""
        result = self._run(job_id, cause, prepare, on_commit, source, defer_derivation)
        if result.derivation_deferred:
            later = self._run(job_id, "derivation_deferred", None, None, source, False)
            result.dispatched = result.dispatched + later.dispatched
            result.derived_created += later.derived_created
            result.held = later.held
            if on_commit is not None:  # held back by the first run: it sees both runs' work
                on_commit(result)
        return result

    def _run(
        self,
        job_id: str,
        cause: str,
        prepare: Prepare | None,
        on_commit: OnCommit | None,
        source: str,
        defer_derivation: bool,
    ) -> RunResult:
        try:
            return self._run_once(job_id, cause, prepare, on_commit, source, defer_derivation)
        except _StaleSpec:
            # The caller's statements ran with a spec the job no longer has (or before the job
            # was planned): rolled back; the run again, without guessing.
            self._specs.pop(job_id, None)
            return self._run_once(
                job_id, cause, prepare, on_commit, source, defer_derivation, speculate=False
            )

    def _run_once(
        self,
        job_id: str,
        cause: str,
        prepare: Prepare | None,
        on_commit: OnCommit | None,
        source: str,
        defer_derivation: bool,
        *,
        speculate: bool = True,
    ) -> RunResult:
        t0 = time.perf_counter()
        deferred = False
        known = self._specs.get(job_id) if speculate and prepare is not None else None
        with self.pool.connection() as conn, pipelined_transaction(conn) as tx:
            # ONE round trip: BEGIN, the job lock, the caller's statements (sent with the spec
            # the job had at this coordinator's last run, checked against the locked row below)
            # and the snapshot (it needs only the job's id; unused if the job must be planned).
            with conn.pipeline():
                tx.begin()
                lock_cur = conn.execute(Q("job_lock"), {"job_id": job_id})
                finish = prepare(conn, known[1]) if prepare is not None and known else None
                read_sent = send_snapshot_of(conn, job_id)
            job = lock_cur.fetchone()
            if job is None:
                tx.rollback_at_end()  # of what the caller's statements did, if sent
                self._specs.pop(job_id, None)
                return RunResult(job_id, Outcome.NOT_FOUND, "no such job")
            if finish is not None and not _guess_holds(job, known):
                raise _StaleSpec  # rolls back what the caller's statements did
            spec = self._spec_of(job_id, job)
            if job["status"] == JobStatus.CANCELLED.value:
                # Its ImportJob was deleted: nothing moves until it is submitted again (a late
                # completion or a timer must not reopen it and dispatch for nobody). What the
                # caller's statements did, if sent, is rolled back.
                tx.rollback_at_end()
                self._specs.pop(job_id, None)
                return RunResult(job_id, Outcome.CANCELLED, job["status_reason"] or "cancelled")
            verdict = plan(conn, job_id, spec, self.tenant) if job["planned_at"] is None else None
            if verdict is not None and not verdict.ok:
                # Not planned: the job stays unplanned and `invalid`; every run counts the
                # staging rows again, so rows loaded (or fixed) later start the import.
                refused = (job["status"], job["status_reason"]) != ("invalid", verdict.message)
                if refused:
                    conn.execute(
                        Q("job_set_outcome"),
                        {
                            "job_id": job_id,
                            "status": JobStatus.INVALID.value,
                            "reason": verdict.message,
                            "code": verdict.code.value,
                        },
                    )
            else:
                if finish is not None:
                    finish()
                    snap = read_sent(job, spec)
                elif prepare is not None:
                    with conn.pipeline():  # ONE round trip: the caller's reads, the snapshot
                        finish = prepare(conn, spec)
                        read = send_snapshot(conn, job, spec)
                    finish()
                    snap = read()
                elif verdict is None:
                    snap = read_sent(job, spec)
                else:
                    snap = read_snapshot(conn, job, spec)  # planned just now
                created = derived.Created()
                while snap.awaiting_derivation:
                    # The snapshot, one instant, says whether any completed parent batch still
                    # lacks its derived batches (level-based: the parent batch just completed, or
                    # one whose completion prompt never came; or one that completed while this
                    # run created the others: the snapshot after creating says so).
                    when = derivation(snap) if defer_derivation else Derivation.NOW
                    if when == Derivation.AFTER_DISPATCH:
                        deferred = True  # dispatch first; the second run creates them
                        break
                    if when == Derivation.AT_THRESHOLD:
                        break  # the run that sees the threshold crossed creates them
                    step, snap = self._derive(conn, job, spec)
                    created += step
                    if not step.parent_batches:
                        break  # nothing the creation can take now: the next run looks again
                decision = decide(snap)
                decision, held = self._within_budget(job_id, spec, snap, decision)
                if decision.job_status == JobStatus.COMPLETED:
                    decision = self._verify_completion(conn, job_id, decision)
                changed = decision.job_status is not None and decision.job_status != snap.status
                dispatched = self._dispatch(conn, tx, job, spec, snap, decision, changed)
        if verdict is not None and not verdict.ok:
            if refused:
                event(
                    log,
                    "job_invalid",
                    logging.WARNING,
                    job_id=job_id,
                    tenant=self.tenant,
                    code=verdict.code.value,
                    reason=verdict.message,
                )
            self.flags.clear_monitoring(job_id)
            return RunResult(
                job_id,
                Outcome.INVALID,
                verdict.message,
                decision=Decision(
                    Outcome.INVALID,
                    verdict.message,
                    job_status=JobStatus.INVALID,
                    keep_monitoring=False,
                    code=verdict.code.value,
                ),
                seconds=time.perf_counter() - t0,
            )
        result = RunResult(
            job_id,
            decision.outcome,
            decision.reason,
            dispatched,
            len(created.batch_ids),
            snapshot=snap,
            decision=decision,
            held=held,
            derivation_deferred=deferred,
        )
        if decision.outcome in TERMINAL_OUTCOMES:
            self._specs.pop(job_id, None)
            if self.capacity is not None:
                self.capacity.forget(job_id)
        self._after_commit(
            spec, snap, decision, created, dispatched, cause, result, on_commit, source
        )
        result.seconds = time.perf_counter() - t0
        return result

    # -- inside the transaction ----------------------------------------------------------------
    @staticmethod
    def _derive(
        conn: Conn, job: dict[str, Any], spec: ImportSpec
    ) -> tuple[derived.Created, Snapshot]:
        """Create the derived batches of the completed parent batches that lack them (up to
        PARENTS_PER_STATEMENT of them for one derived type), and read the snapshot again so the
        decision sees them: one round trip for one derived type (the creation and the snapshot
        pipelined), more for several types."""
        job_id = job["job_id"]
        with conn.pipeline():
            reply = derived.send_create(conn, job_id, spec)
            read = send_snapshot(conn, job, spec) if reply is not None else None
        if reply is None or read is None:
            created = derived.create_for_completed_parents(conn, job_id, spec)
            return created, read_snapshot(conn, job, spec)
        return reply(), read()

    def _within_budget(
        self, job_id: str, spec: ImportSpec, snap: Snapshot, decision: Decision
    ) -> tuple[Decision, int]:
        """The decision bounded by this import's grant of the shared budget (engine/budget.py),
        and how many batches the budget held back. Decided again with the job's parallelism
        lowered to what it holds plus its grant: the same rules pick which batches go."""
        if self.capacity is None or snap.suspended:
            return decision, 0
        wanted = sum(d.limit for d in decision.dispatches)
        grant = self.capacity.grant(
            self.tenant,
            job_id,
            active=snap.active,
            wanted=wanted,
            priority=spec.priority,
            nudge=lambda: self._nudged(job_id),
        )
        if grant.granted >= wanted:
            return decision, 0
        bounded = decide(replace(snap, parallelism=snap.active + grant.granted))
        waiting = waiting_message(grant, self.capacity.budget)
        if bounded.outcome == Outcome.FAILED:
            # "nothing else can run" is not true of batches the budget holds back
            return (
                Decision(
                    Outcome.IN_PROGRESS,
                    waiting,
                    job_status=JobStatus.RUNNING if snap.status != JobStatus.RUNNING else None,
                    guard=bounded.guard,
                    derived_ready=bounded.derived_ready,
                ),
                grant.held,
            )
        return replace(bounded, reason=f"{bounded.reason}; {waiting}"), grant.held

    def _nudged(self, job_id: str) -> None:
        """The capacity keeper freed slots this waiting import may take: look again."""
        try:
            self.check_and_trigger_next_wave(job_id, cause="capacity_freed")
        except Exception as exc:  # the timer and the next completion retry; never raise here
            event(
                log,
                "capacity_nudge_failed",
                logging.WARNING,
                job_id=job_id,
                error=type(exc).__name__,
            )

    def _verify_completion(self, conn: Conn, job_id: str, decision: Decision) -> Decision:
        """Decide "completed" only from a fresh look at the batch rows, in this transaction:
        every batch completed, and per record type the rows the completing workers recorded
        equal the rows planned, and the rows staged now equal the rows planned plus skipped."""
        rows = conn.execute(Q("unfinished_by_type"), {"job_id": job_id}).fetchall()
        if not rows:
            problems = completion_problems(self._type_rows(conn, job_id))
            if not problems:
                return decision
            text = "; ".join(problems)
            event(log, "completion_rows_mismatch", logging.ERROR, job_id=job_id, problems=text)
            return replace(
                decision,
                outcome=Outcome.FAILED,
                job_status=JobStatus.FAILED,
                reason=f"rows do not add up, not completing: {text}"[:4000],
                keep_monitoring=False,
                code=Code.ROW_COUNT_MISMATCH.value,
            )
        left = ", ".join(f"{r['n']} {r['status']} of type {r['record_type_id']}" for r in rows)
        event(
            log, "completion_guard_counter_mismatch", logging.ERROR, job_id=job_id, unfinished=left
        )
        return replace(
            decision,
            outcome=Outcome.DERIVED_PENDING,
            job_status=None,
            reason=f"not completing: {left}",
            keep_monitoring=True,
        )

    @staticmethod
    def _type_rows(conn: Conn, job_id: str) -> list[TypeRows]:
        """Fresh per-type rows: staged now, planned, written, skipped (record types the spec
        does not list: their rows staged now against those skipped at planning)."""
        staged = {
            int(r["record_type_id"]): int(r["n"])
            for r in conn.execute(Q("staging_counts"), {"job_id": job_id}).fetchall()
        }
        out = [
            TypeRows(
                int(r["record_type_id"]),
                r["record_type_name"],
                staged.pop(int(r["record_type_id"]), 0),
                int(r["planned"]),
                int(r["written"]),
                int(r["rows_skipped"]),
                int(r["uncounted"]),
            )
            for r in conn.execute(Q("rows_by_type"), {"job_id": job_id}).fetchall()
        ]
        job = conn.execute(Q("job_get"), {"job_id": job_id}).fetchone()
        report = (job or {}).get("staging_report") or {}
        skipped = {
            int(t["recordTypeId"]): int(t.get("skipped", 0)) for t in report.get("types", [])
        }
        for rid, n in sorted(staged.items()):
            out.append(TypeRows(rid, "not in the spec", n, 0, 0, skipped.get(rid, 0)))
        return out

    def _dispatch(
        self,
        conn: Conn,
        tx: PipelinedTransaction,
        job: dict[str, Any],
        spec: ImportSpec,
        snap: Snapshot,
        decision: Decision,
        changed: bool,
    ) -> list[BatchDispatch]:
        """Apply the decision in the run's transaction: its dispatches, the job's status when
        `changed`, the prompt, and the commit; the batches dispatched."""
        # What the decision writes and the COMMIT, sent in ONE round trip (pipeline mode): the
        # dispatches, the job's status, the prompt. A statement that fails makes the server
        # skip the COMMIT behind it: the run then rolls back.
        ready = self._ready(conn, job, spec, snap, decision)
        if decision.outcome == Outcome.SUSPENDED and snap.active:
            self._release_unclaimed(conn, snap.job_id)
        with conn.pipeline():
            sent = self._send_dispatches(conn, snap, decision, ready)
            if changed:
                assert decision.job_status is not None
                conn.execute(
                    Q("job_set_outcome"),
                    {
                        "job_id": snap.job_id,
                        "status": decision.job_status.value,
                        "reason": decision.reason,
                        "code": decision.code,
                    },
                )
            if decision.dispatches or changed:
                # Delivered at this commit: idle pooled workers of the job try to claim
                # (or, the job being over, exit). A prompt; the rows are the truth. Sent
                # only if this run dispatched a batch or changed the job's status (the
                # statement looks: the dispatches' replies are not read yet).
                conn.execute(
                    Q("notify_tenant_if_dispatched"),
                    {
                        "channel": channel_for(self.tenant),
                        "payload": prompt_payload(
                            "dispatched" if decision.dispatches else "status",
                            self.tenant,
                            snap.job_id,
                        ),
                        "changed": changed,
                        "job_id": snap.job_id,
                        "waves": [d.wave_number for d in decision.dispatches],
                    },
                )
            if not changed:
                # A run that records no job status need not wait for its commit's WAL
                # flush (relaxed_commit in queries.sql says what a crash may lose).
                conn.execute(Q("relaxed_commit"))
            tx.commit()
        return self._collect_dispatches(snap, sent)

    def _release_unclaimed(self, conn: Conn, job_id: str) -> None:
        """Suspended: dispatched batches no worker took go back to pending (no attempt), so
        nothing counts as running once the batches in workers' hands have ended."""
        rows = conn.execute(
            Q("batches_release_unclaimed"),
            {"job_id": job_id, "reason": "released: the job was suspended before a worker took it"},
        ).fetchall()
        if rows:
            event(
                log,
                "unclaimed_batches_released",
                job_id=job_id,
                tenant=self.tenant,
                released=len(rows),
                reason="suspended",
            )

    def _ready(
        self,
        conn: Conn,
        job: dict[str, Any],
        spec: ImportSpec,
        snap: Snapshot,
        decision: Decision,
    ) -> dict[int, datetime | None]:
        """For each wave the decision dispatches for the first time: when it became
        dispatchable (read before the dispatch statements, which stamp the lag with it)."""
        return {
            d.wave_number: self._ready_at(conn, job, spec, snap, snap.wave(d.wave_number))
            for d in decision.dispatches
            if snap.wave(d.wave_number).first_dispatched_at is None
        }

    @staticmethod
    def _send_dispatches(
        conn: Conn, snap: Snapshot, decision: Decision, ready: dict[int, datetime | None]
    ) -> list[tuple[WaveState, bool, Any]]:
        """Send the decision's dispatch statements (in the caller's pipeline); their cursors."""
        sent = []
        for d in decision.dispatches:
            params: dict[str, Any] = {
                "job_id": snap.job_id,
                "wave_number": d.wave_number,
                "limit": d.limit,
            }
            first = d.wave_number in ready
            if first:
                # The same statement stamps the wave's first dispatch and its lag (the
                # database's clock, now, minus when the wave became dispatchable).
                params["ready_at"] = ready[d.wave_number]
            # prepared at once: the first dispatch of a wave runs a few times per import, never
            # reaching psycopg's prepare threshold, and its parse and plan are on the lag's path
            cur = conn.execute(
                Q("batches_dispatch_first" if first else "batches_dispatch"), params, prepare=True
            )
            sent.append((snap.wave(d.wave_number), first, cur))
        return sent

    def _collect_dispatches(
        self, snap: Snapshot, sent: list[tuple[WaveState, bool, Any]]
    ) -> list[BatchDispatch]:
        out: list[BatchDispatch] = []
        for wave, first, cur in sent:
            rows = cur.fetchall()
            out += [BatchDispatch.from_row(snap.job_id, r) for r in rows]
            lag = rows[0]["lag"] if first and rows else None
            if lag is not None:
                level = "derived" if wave.is_derived else "main"
                metrics.DISPATCH_LAG.labels(self.tenant, level).observe(lag)
        return out

    def _ready_at(
        self, conn: Conn, job: dict[str, Any], spec: ImportSpec, snap: Snapshot, wave: WaveState
    ) -> datetime | None:
        """When the wave became dispatchable: the previous main wave's last completion, or the
        commit of the parent batch that took the parents over the threshold."""
        if not wave.is_derived:
            earlier = [w for w in snap.main_waves if w.wave_number < wave.wave_number]
            if earlier:
                return max(w.last_completed_at or job["planned_at"] for w in earlier)
            return job["planned_at"]  # type: ignore[no-any-return]
        gate = next(g for g in snap.gates if g.wave_number == wave.wave_number)
        k = gate.parents_needed
        if k <= 0:
            return job["planned_at"]  # type: ignore[no-any-return]
        dt = next(d for d in spec.derivedTypes if d.recordTypeId == wave.record_type_id)
        if gate.parent_completed == k:
            # The k-th completion is the latest one (always so at threshold 100): the parents'
            # wave counters already hold it, no need to sort the parent batches.
            parents = set(spec.parent_ids_of(dt))
            return max(
                (
                    w.last_completed_at
                    for w in snap.waves
                    if w.record_type_id in parents and w.last_completed_at is not None
                ),
                default=None,
            )
        row = conn.execute(
            Q("parent_threshold_reached_at"),
            {
                "job_id": snap.job_id,
                "parent_type_ids": spec.parent_ids_of(dt),
                "k": k,
            },
        ).fetchone()
        return row["completed_at"] if row else None

    # -- after the commit ----------------------------------------------------------------------
    def _after_commit(
        self,
        spec: ImportSpec,
        snap: Snapshot,
        decision: Decision,
        created: derived.Created,
        dispatched: list[BatchDispatch],
        cause: str,
        result: RunResult,
        on_commit: OnCommit | None = None,
        source: str = "coordinator",
    ) -> None:
        job_id = snap.job_id
        # Workers first: everything else here is bookkeeping that no worker waits for.
        if dispatched and self.on_dispatched is not None:
            self.on_dispatched(job_id, spec, dispatched, snapshot_waves=snap.waves)
        if on_commit is not None and not result.derivation_deferred:
            on_commit(result)
        if decision.keep_monitoring:
            self.flags.set_monitoring(job_id)  # refreshes the TTL on every run
        else:
            self.flags.clear_monitoring(job_id)
        gate_open = decision.derived_ready and decision.keep_monitoring
        if gate_open and self.flags.derived_ready(job_id) is None:
            # DB fallback (seed E): the gate is open in the DB, so restore the flag.
            self.flags.set_derived_ready(job_id)
            if self.flags.enabled:
                event(log, "derived_ready_flag_restored_from_db", job_id=job_id, tenant=self.tenant)

        guard = decision.guard
        if guard is not None and guard.main_done:
            metrics.GUARD_DECISIONS.labels(self.tenant, decision.outcome.value).inc()
            event(
                log,
                "completion_guard",
                job_id=job_id,
                tenant=self.tenant,
                outcome=decision.outcome.value,
                derived_pending=guard.derived_unfinished > 0,
                derived_unfinished=guard.derived_unfinished,
                derived_active=guard.derived_active,
                awaiting_derivation=guard.awaiting_derivation,
                gates_open=guard.gates_open,
                monitoring_kept=decision.keep_monitoring,
                cause=cause,
            )
        by_wave: dict[int, int] = {}
        for b in dispatched:
            by_wave[b.wave_number] = by_wave.get(b.wave_number, 0) + 1
        for wave_number, n in by_wave.items():
            is_derived = snap.wave(wave_number).is_derived
            metrics.DISPATCHED.labels(self.tenant, "derived" if is_derived else "main").inc(n)
            event(
                log,
                "derived_wave_dispatched" if is_derived else "wave_dispatched",
                job_id=job_id,
                tenant=self.tenant,
                wave_number=wave_number,
                dispatched_batch_count=n,
                cause=cause,
            )
        if decision.job_status == JobStatus.COMPLETED and snap.status != JobStatus.COMPLETED:
            # counted once: the run that recorded the completion, after its commit
            for w in snap.waves:
                metrics.ROWS_IMPORTED.labels(self.tenant, w.name).inc(w.rows_written)
        if decision.job_status is not None and decision.job_status != snap.status:
            event(
                log,
                f"job_{decision.job_status.value}",
                job_id=job_id,
                tenant=self.tenant,
                reason=decision.reason,
            )

        if created.batch_ids:
            # Created and decided on in this run, under this lock: the event says so, and its
            # handler has nothing left to nudge.
            self.bus.emit(
                DerivedWavesCreated(
                    self.tenant,
                    job_id,
                    tuple(sorted(created.wave_numbers)),
                    len(created.batch_ids),
                    source=source,
                    decided=True,
                )
            )
