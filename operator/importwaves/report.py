"""The operator's view of one job (the seed's operational guidance as one command)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from importwaves.db.connect import Conn
from importwaves.db.queries import Q
from importwaves.engine.jobrow import load_job
from importwaves.engine.model import DerivedGate, WaveState
from importwaves.engine.rows import rows_by_name
from importwaves.engine.snapshot import gates, read_waves
from importwaves.flags import DERIVED_READY, MONITORING, Flags


@dataclass
class FlagState:
    name: str
    value: bool | None
    ttl_seconds: int | None


@dataclass
class JobReport:
    job_id: str
    tenant: str
    status: str
    status_reason: str
    last_dispatch_lag_seconds: float | None
    threshold: int
    waves: list[WaveState]
    gates: list[DerivedGate]
    batches_by_type: list[dict[str, Any]]
    derived_unfinished: list[dict[str, Any]]
    stuck: list[dict[str, Any]]
    failed: list[dict[str, Any]]
    flags: list[FlagState] = field(default_factory=list)
    cache: str = "disabled"
    #: staged / imported / skipped rows per record type (name)
    rows: dict[str, dict[str, int]] = field(default_factory=dict)
    status_code: str = ""

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["gates"] = [
            {**asdict(g), "percent": round(g.percent, 2), "open": g.open} for g in self.gates
        ]
        return out


def job_report(conn: Conn, flags: Flags, job_id: str) -> JobReport | None:
    loaded = load_job(conn, job_id)
    if loaded is None:
        return None
    job, spec = loaded
    waves = read_waves(conn, job_id)
    derived_ids = {d.recordTypeId for d in spec.derivedTypes}
    by_type = [
        dict(r) for r in conn.execute(Q("batches_by_type_status"), {"job_id": job_id}).fetchall()
    ]
    flag_states = [
        FlagState(MONITORING, flags.monitoring(job_id), flags.ttl_of(job_id, MONITORING)),
        FlagState(DERIVED_READY, flags.derived_ready(job_id), flags.ttl_of(job_id, DERIVED_READY)),
    ]
    cache = "disabled"
    if flags.enabled:
        cache = "up" if flags.ping() else "unreachable (the engine runs from the database)"
    return JobReport(
        job_id=job_id,
        tenant=flags.tenant,
        status=job["status"],
        status_reason=job["status_reason"],
        last_dispatch_lag_seconds=job["last_dispatch_lag_seconds"],
        threshold=spec.completionThreshold,
        waves=list(waves),
        gates=list(gates(spec, waves)),
        batches_by_type=by_type,
        derived_unfinished=[
            r for r in by_type if r["record_type_id"] in derived_ids and r["status"] != "completed"
        ],
        stuck=[
            dict(r)
            for r in conn.execute(
                Q("batches_stuck"),
                {
                    "job_id": job_id,
                    "stale_after": spec.staleAfterSeconds,
                    "claim_timeout": spec.claim_timeout,
                },
            ).fetchall()
        ],
        failed=[
            dict(r)
            for r in conn.execute(Q("batches_failed"), {"job_id": job_id, "limit": 20}).fetchall()
        ],
        flags=flag_states,
        cache=cache,
        rows={
            name: {"staged": r.staged, "imported": r.imported, "skipped": r.skipped}
            for name, r in rows_by_name(waves, job.get("staging_report")).items()
        },
        status_code=job.get("status_code") or "",
    )


def render(report: JobReport) -> Any:
    """A rich renderable (tables) for the terminal."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    head = Text.assemble(
        ("job ", "bold"),
        (report.job_id, "bold cyan"),
        f"  tenant {report.tenant}  status ",
        (report.status, "bold green" if report.status == "completed" else "bold yellow"),
        f"  [{report.status_code}]" if report.status_code else "",
        f"  ({report.status_reason})" if report.status_reason else "",
    )
    waves = Table(title="waves", title_justify="left")
    for col in (
        "wave",
        "record type",
        "level",
        "status",
        "total",
        "pending",
        "dispatched",
        "processing",
        "completed",
        "failed",
    ):
        waves.add_column(
            col, justify="right" if col not in ("record type", "status", "level") else "left"
        )
    for w in report.waves:
        waves.add_row(
            str(w.wave_number),
            f"{w.name} ({w.record_type_id})",
            "derived" if w.is_derived else "main",
            _wave_status(w),
            str(w.total),
            str(w.pending),
            str(w.dispatched),
            str(w.processing),
            str(w.completed),
            str(w.failed),
        )
    gates_t = Table(title="derived gates (parent completion vs threshold)", title_justify="left")
    for col in ("derived wave", "parents completed", "percent", "threshold", "gate"):
        gates_t.add_column(col)
    for g in report.gates:
        gates_t.add_row(
            str(g.wave_number),
            f"{g.parent_completed}/{g.parent_total}",
            f"{g.percent:.1f}%",
            f"{g.threshold}%",
            "open" if g.open else "closed",
        )
    flags_t = Table(title=f"cache flags (redis: {report.cache})", title_justify="left")
    for col in ("flag", "value", "ttl (s)"):
        flags_t.add_column(col)
    for f in report.flags:
        flags_t.add_row(
            f.name,
            {True: "set", False: "false", None: "missing"}[f.value],
            "-" if f.ttl_seconds is None else str(f.ttl_seconds),
        )
    rows_t = Table(title="rows per record type", title_justify="left")
    for col in ("record type", "staged", "imported", "skipped"):
        rows_t.add_column(col, justify="left" if col == "record type" else "right")
    for name, counts in report.rows.items():
        rows_t.add_row(name, str(counts["staged"]), str(counts["imported"]), str(counts["skipped"]))
    parts: list[Any] = [head, waves, rows_t, gates_t, flags_t]
    if report.derived_unfinished:
        t = Table(title="derived batches not completed", title_justify="left")
        for col in ("record type", "status", "batches"):
            t.add_column(col)
        for r in report.derived_unfinished:
            t.add_row(str(r["record_type_id"]), r["status"], str(r["n"]))
        parts.append(t)
    for title, rows in (
        ("batches that look stuck", report.stuck),
        ("failed batches", report.failed),
    ):
        if rows:
            t = Table(title=title, title_justify="left")
            for col in rows[0]:
                t.add_column(col)
            for r in rows:
                t.add_row(*["" if v is None else str(v) for v in r.values()])
            parts.append(t)
    if report.last_dispatch_lag_seconds is not None:
        parts.append(Text(f"last dispatch lag: {report.last_dispatch_lag_seconds * 1000:.1f} ms"))
    return Group(*parts)


def _wave_status(w: WaveState) -> str:
    if w.is_derived and w.total == 0:
        return "awaiting parents"
    return w.status
