"""`importwaves demo`: the reference import on a machine with nothing installed.

Starts an embedded PostgreSQL (and a Redis, if one can be started), generates a tenant data set,
runs the import with local worker processes while showing live progress per wave, then prints a
summary and verifies the result from the database.
"""

from __future__ import annotations

import contextlib
import shutil
import time
from pathlib import Path
from typing import Any

import psycopg
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from importwaves import log as iwlog
from importwaves.datagen import generate, reference_spec
from importwaves.db import migrate
from importwaves.db.connect import connect
from importwaves.engine.app import Engine
from importwaves.engine.model import WaveState
from importwaves.engine.snapshot import read_waves
from importwaves.launch.local import LocalLauncher
from importwaves.launch.port import LaunchTarget
from importwaves.localdev import LocalPostgres, LocalRedis
from importwaves.runner import LocalRunner
from importwaves.verify import verify_import

TENANT = "demo"
JOB_ID = "demo-import"


def run_demo(
    *,
    orders: int,
    customers: int | None,
    parallelism: int,
    use_redis: bool,
    workdir: Path,
    keep: bool,
    console: Console,
) -> int:
    workdir = workdir.absolute()
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    log_path = workdir / "importwaves.log"
    iwlog.setup("INFO", log_path.open("w"))
    console.rule("[bold]importwaves demo")
    t0 = time.monotonic()
    pg = LocalPostgres(workdir / "pg").start()
    console.print(f"PostgreSQL {_pg_version(pg.dsn())} (embedded) on 127.0.0.1:{pg.port}")
    redis_srv: LocalRedis | None = None
    if use_redis:
        try:
            redis_srv = LocalRedis(workdir / "redis").start()
            console.print(f"Redis on 127.0.0.1:{redis_srv.port} (fast-path flags)")
        except (OSError, RuntimeError, ImportError) as exc:
            console.print(
                f"[yellow]Redis could not be started ({exc}); running cache-less: "
                "the database answers every flag read.[/]"
            )
    else:
        console.print(
            "[yellow]Running cache-less (--no-redis): the database answers every flag read.[/]"
        )
    try:
        return _run(
            pg,
            redis_srv,
            orders=orders,
            customers=customers,
            parallelism=parallelism,
            console=console,
            t0=t0,
            log_path=log_path,
        )
    finally:
        if redis_srv:
            redis_srv.stop()
        if keep:
            pg.stop()
            console.print(f"kept data in {workdir} (start it again with pg_ctl)")
        else:
            pg.destroy()
            with contextlib.suppress(OSError):
                shutil.rmtree(workdir / "redis")


def _run(
    pg: LocalPostgres,
    redis_srv: LocalRedis | None,
    *,
    orders: int,
    customers: int | None,
    parallelism: int,
    console: Console,
    t0: float,
    log_path: Path,
) -> int:
    dsn = pg.dsn()
    with psycopg.connect(dsn, autocommit=True) as admin:
        migrate.up(admin, TENANT)
    t_gen = time.monotonic()
    with connect(dsn, TENANT, autocommit=True) as tconn:
        data = generate(tconn, JOB_ID, orders=orders, customers=customers)
    console.print(
        f"staged {data.customers:,} customers, {data.orders:,} sales orders, "
        f"{data.lines:,} transaction lines in {time.monotonic() - t_gen:.1f}s"
    )
    spec = reference_spec(TENANT, parallelism=parallelism)
    with (
        LocalLauncher(dsn) as launcher,
        Engine(
            dsn, TENANT, redis_url=redis_srv.url if redis_srv else None, launcher=launcher
        ) as engine,
    ):
        engine.submit(JOB_ID, spec, target=LaunchTarget("local"))
        runner = LocalRunner(engine, tick=0.5, sweep_every=15)
        t_run = time.monotonic()
        with Live(console=console, refresh_per_second=8, transient=False) as live:

            def progress() -> None:
                with engine.pool.connection() as conn:
                    waves = read_waves(conn, JOB_ID)
                live.update(_progress_view(waves, time.monotonic() - t_run, launcher.live(JOB_ID)))

            stats = runner.run(JOB_ID, timeout=1800, on_progress=progress)
        with engine.pool.connection() as conn:
            waves = read_waves(conn, JOB_ID)
            lag_rows = conn.execute(
                "SELECT wave_number, dispatch_lag_seconds, first_dispatched_at, completed_at "
                "FROM wave_coordination WHERE job_id = %s ORDER BY wave_number",
                (JOB_ID,),
            ).fetchall()
            verification = verify_import(conn, JOB_ID, spec)
    console.print(
        _summary(
            waves, lag_rows, stats.seconds, stats.worker_runs, stats.worker_failures, parallelism
        ),
        f"{stats.notified} completions reached the coordinator by NOTIFY at commit; "
        f"{launcher.started} pooled worker process(es) ran the {stats.worker_runs} attempts",
    )
    console.print(_verification(verification.checks))
    console.print(
        f"total wall time (setup + data + import + verify): "
        f"{time.monotonic() - t0:.1f}s; JSON logs: {log_path}"
    )
    if verification.ok:
        console.print(
            "[bold green]VERIFIED[/]: every staged row imported, every line has its "
            "parent, no batch left unfinished."
        )
        return 0
    console.print("[bold red]VERIFICATION FAILED[/]: " + "; ".join(verification.failures()))
    return 1


def _pg_version(dsn: str) -> str:
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SHOW server_version").fetchone()
    return str(row[0]) if row else "?"


def _bar(done: int, total: int, width: int = 30) -> str:
    if total == 0:
        return "·" * width
    filled = int(width * done / total)
    return "█" * filled + "░" * (width - filled)


def _progress_view(waves: tuple[WaveState, ...], elapsed: float, workers: int) -> Any:
    t = Table(
        title=f"import {JOB_ID}: {elapsed:5.1f}s, {workers} worker(s) running",
        title_justify="left",
        show_edge=False,
    )
    for col in ("wave", "record type", "progress", "done/total", "active", "failed", "status"):
        t.add_column(col)
    for w in waves:
        status = "awaiting parents" if w.is_derived and w.total == 0 else w.status
        t.add_row(
            str(w.wave_number),
            f"{w.name}{' (derived)' if w.is_derived else ''}",
            _bar(w.completed, w.total),
            f"{w.completed}/{w.total}",
            str(w.active),
            str(w.failed),
            status,
        )
    return t


def _summary(
    waves: tuple[WaveState, ...],
    lag_rows: list[Any],
    seconds: float,
    runs: int,
    failures: int,
    parallelism: int,
) -> Any:
    lags = {r["wave_number"]: r for r in lag_rows}
    t = Table(title="summary", title_justify="left")
    for col in (
        "wave",
        "record type",
        "batches",
        "rows staged",
        "rows imported",
        "wall time",
        "dispatch lag",
    ):
        t.add_column(col, justify="left" if col == "record type" else "right")
    derived_lag: list[float] = []
    for w in waves:
        r = lags[w.wave_number]
        wall = (
            (r["completed_at"] - r["first_dispatched_at"]).total_seconds()
            if r["completed_at"] and r["first_dispatched_at"]
            else None
        )
        lag = r["dispatch_lag_seconds"]
        if w.is_derived and lag is not None:
            derived_lag.append(lag)
        t.add_row(
            str(w.wave_number),
            f"{w.name}{' (derived)' if w.is_derived else ''}",
            f"{w.completed}/{w.total}",
            f"{w.rows_staged:,}" + (f" ({w.rows_skipped:,} skipped)" if w.rows_skipped else ""),
            f"{w.rows_written:,}",
            "-" if wall is None else f"{wall:.2f}s",
            "-" if lag is None else f"{lag * 1000:.1f} ms",
        )
    total = sum(w.total for w in waves)
    done = sum(w.completed for w in waves)
    t.add_section()
    t.add_row(
        "",
        "all waves",
        f"{done}/{total}",
        f"{sum(w.rows_staged for w in waves):,}",
        f"{sum(w.rows_written for w in waves):,}",
        f"{seconds:.2f}s",
        f"derived: {derived_lag[0] * 1000:.1f} ms" if derived_lag else "-",
    )
    foot = Text(
        f"{len(waves)} waves, {total} batches, {runs} worker runs "
        f"({failures} failed attempts), parallelism {parallelism}"
    )
    return Group(t, foot)


def _verification(checks: list[tuple[str, bool, str]]) -> Any:
    t = Table(title="verification (from the database)", title_justify="left")
    t.add_column("check")
    t.add_column("result")
    t.add_column("detail")
    for name, ok, detail in checks:
        t.add_row(name, "[green]ok[/]" if ok else "[red]FAILED[/]", detail)
    return t
