"""Tenant isolation, pure parts: the redaction helper, connection options, the NOTIFY payload and
channel rules, worker Job annotations read defensively, and the operator's engine cache (no shared
lock around network work, replaced on a DSN change, evicted when its ImportJobs finish)."""

from __future__ import annotations

import io
import json
import logging
import threading
import time
from typing import Any

import psycopg
import pytest
from kubernetes import client

from importwaves import redact
from importwaves.db.options import ConnOptions
from importwaves.engine.notify import (
    Prompt,
    channel_for,
    database_identity,
    fingerprint,
    parse,
    parse_prompt,
    prompt_payload,
)
from importwaves.k8s import operator as k8s_operator
from importwaves.k8s.crd import DatabaseRef
from importwaves.k8s.jobs import WAITING_BACKSTOP_S, needs_polling, timer_due
from importwaves.k8s.operator import ImportJobOperator, ProblemError, _db_problem
from importwaves.k8s.status import Problem, ProblemKind
from importwaves.launch.base import MAX_LAUNCH_ERROR, BatchDispatch, LaunchFailure
from importwaves.launch.kubejobs import LABEL_INDEX, build_wave_job, read_wave_job
from importwaves.launch.port import LaunchTarget, WorkerGroup
from importwaves.log import JsonFormatter, event
from importwaves.settings import Settings
from importwaves.spec import WorkerPod

PASSWORD = "S3cr%zzet"
MALFORMED = f"postgresql://importer:{PASSWORD}@db.example:5432/tenants"


def _psycopg_error(dsn: str) -> psycopg.Error:
    try:
        psycopg.connect(dsn, connect_timeout=1)
    except psycopg.Error as exc:
        return exc
    raise AssertionError("connected")


# -- redaction ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("dsn", "expected"),
    [
        (MALFORMED, [PASSWORD]),
        ("postgresql://u:p%40ss@h/db", ["p%40ss", "p@ss"]),
        ("postgres://u@h/db", []),
        ("host=h user=u password=hunter22 dbname=d", ["hunter22"]),
        ("host=h password='two words' dbname=d", ["two words"]),
        ("postgresql://h/db?user=u&password=qs-secret", ["qs-secret"]),
    ],
)
def test_passwords_are_found_by_shape(dsn: str, expected: list[str]) -> None:
    assert redact.passwords_in(dsn) == expected


def test_psycopg_quotes_the_password_and_describe_does_not() -> None:
    exc = _psycopg_error(MALFORMED)
    assert PASSWORD in str(exc)  # why this module exists
    d = redact.describe(exc, "the tenant database in Secret ns/db key 'dsn'")
    assert d.kind is redact.DsnProblem.MALFORMED
    assert PASSWORD not in d.message and "zzet" not in d.message
    assert d.message.startswith("the tenant database in Secret ns/db key 'dsn': the DSN is not")


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        (psycopg.errors.ConnectionTimeout("connection timeout expired"), "TIMEOUT"),
        (psycopg.errors.QueryCanceled("canceling statement due to statement timeout"), "TIMEOUT"),
        (psycopg.errors.LockNotAvailable("canceling statement due to lock timeout"), "TIMEOUT"),
        (psycopg.OperationalError('connection to "h" failed: Connection refused'), "UNREACHABLE"),
        (psycopg.OperationalError("failed to resolve host 'x': Name not known"), "UNREACHABLE"),
        (psycopg.OperationalError('FATAL:  password authentication failed for user "u"'), "AUTH"),
        (psycopg.OperationalError("server closed the connection unexpectedly"), "UNREACHABLE"),
        (psycopg.ProgrammingError('invalid percent-encoded token: "x"'), "MALFORMED"),
    ],
)
def test_classify(exc: psycopg.Error, kind: str) -> None:
    assert redact.classify(exc) is redact.DsnProblem[kind]


def test_describe_keeps_the_servers_reason_and_our_words_only() -> None:
    dsn = "postgresql://nobody:pw-in-dsn@127.0.0.1:1/db"
    auth = psycopg.OperationalError(
        'connection failed: connection to server at "127.0.0.1", port 1 failed: '
        'FATAL:  role "nobody" does not exist'
    )
    d = redact.describe(auth, "src", dsn)
    assert d.kind is redact.DsnProblem.AUTH
    assert d.message.endswith('the server said: role "nobody" does not exist (OperationalError)')
    refused = _psycopg_error("postgresql://u:pw-in-dsn@127.0.0.1:1/db")
    r = redact.describe(refused, "src", dsn)
    assert r.kind is redact.DsnProblem.UNREACHABLE and "refused" in r.message
    assert "127.0.0.1" not in r.message and "pw-in-dsn" not in r.message


def test_check_dsn_names_the_source_only() -> None:
    with pytest.raises(ValueError, match="Secret ns/db key 'dsn'") as info:
        redact.check_dsn(MALFORMED, "Secret ns/db key 'dsn'")
    assert PASSWORD not in str(info.value)
    redact.check_dsn("postgresql://u:p@h/db", "x")  # a valid one passes


def test_scrub_removes_remembered_and_shaped_secrets() -> None:
    redact.remember("postgresql://u:rem3mbered-pw@h/db")
    text = (
        "a: rem3mbered-pw; b: postgresql://x:other-pw@h/db; c: host=h password=kv-secret; "
        "d: extra-secret"
    )
    out = redact.scrub(text, "postgresql://y:extra-secret@h/db")
    for secret in ("rem3mbered-pw", "other-pw", "kv-secret", "extra-secret"):
        assert secret not in out, out
    assert "postgresql://***@h/db" in out


def test_json_log_lines_never_carry_a_remembered_password() -> None:
    redact.remember("postgresql://u:l0gged-secret@h/db")
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("importwaves.test.redact")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        event(logger, "oops", error="could not use l0gged-secret")
    finally:
        logger.removeHandler(handler)
    line = stream.getvalue()
    assert "l0gged-secret" not in line and json.loads(line)["error"] == "could not use ***"


def test_the_worker_prints_no_password(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from importwaves import worker

    for var, value in {
        "IMPORTWAVES_DSN": MALFORMED,
        "IMPORTWAVES_TENANT": "t",
        "IMPORTWAVES_JOB_ID": "j",
        "IMPORTWAVES_BATCH_ID": "b",
        "IMPORTWAVES_DISPATCH_SEQ": "1",
    }.items():
        monkeypatch.setenv(var, value)
    assert worker.main() == worker.EXIT_USAGE
    out = capsys.readouterr()
    assert PASSWORD not in out.out + out.err
    assert "IMPORTWAVES_DSN" in out.err and "not a valid PostgreSQL" in out.err


def test_operator_db_problem_is_the_kind_not_the_text() -> None:
    p = _db_problem(_psycopg_error(MALFORMED), "the tenant database in Secret ns/db key 'dsn'")
    assert p.kind is ProblemKind.INVALID_DSN and PASSWORD not in p.message
    t = _db_problem(psycopg.errors.ConnectionTimeout("connection timeout expired"), "src")
    assert t.kind is ProblemKind.DATABASE_TIMEOUT


# -- connection options ------------------------------------------------------------------------
def test_connection_options_set_every_timeout_and_keepalive() -> None:
    kw = ConnOptions().kwargs()
    assert kw["connect_timeout"] == 5 and kw["keepalives"] == 1
    assert {
        "keepalives_idle",
        "keepalives_interval",
        "keepalives_count",
        "tcp_user_timeout",
    } <= set(kw)
    for setting in ("statement_timeout", "lock_timeout", "idle_in_transaction_session_timeout"):
        assert f"-c {setting}=" in kw["options"]


def test_connection_options_from_env_and_back() -> None:
    opts = ConnOptions.from_env(
        {"IMPORTWAVES_CONNECT_TIMEOUT": "2", "IMPORTWAVES_LOCK_TIMEOUT_MS": "junk"}
    )
    assert opts.connect_timeout == 2 and opts.lock_timeout_ms == ConnOptions().lock_timeout_ms
    assert ConnOptions.from_env(opts.env()) == opts


# -- notifications -----------------------------------------------------------------------------
def test_channel_per_tenant_fits_an_identifier() -> None:
    assert channel_for("acme") == "importwaves_acme"
    assert len(channel_for("a" * 48).encode()) <= 63


def test_database_identity_ignores_the_password_and_refuses_a_malformed_dsn() -> None:
    a = database_identity("postgresql://u:one@h:5433/db")
    b = database_identity("host=h port=5433 dbname=db user=u password=two")
    assert a == b and "one" not in str(a)
    with pytest.raises(ValueError) as info:
        database_identity(MALFORMED)
    assert PASSWORD not in str(info.value)
    assert fingerprint("x") != fingerprint("y") and "x" not in fingerprint("x")


def test_parse_accepts_only_a_well_formed_completion() -> None:
    ok = '{"tenant":"t","job_id":"j","batch_id":"b","dispatch_seq":3}'
    c = parse(ok)
    assert c is not None and (c.tenant, c.dispatch_seq) == ("t", 3)
    assert parse(ok.replace("3}", '"3"}')) is None
    # a prompt (dispatched, status, failed) is never taken for a completion, and vice versa
    assert parse(prompt_payload("dispatched", "t", "j")) is None
    assert parse_prompt(ok) is None


def test_parse_prompt_accepts_only_known_kinds_with_tenant_and_job() -> None:
    for kind in ("dispatched", "status", "failed"):
        assert parse_prompt(prompt_payload(kind, "t", "j")) == Prompt(kind, "t", "j")
    assert parse_prompt(prompt_payload("completed", "t", "j")) is None
    assert parse_prompt('{"kind":"dispatched","tenant":"t"}') is None
    assert parse_prompt('{"kind":"dispatched","tenant":"t","job_id":7}') is None
    assert parse_prompt("not json") is None
    assert parse_prompt("x" * 5000) is None


# -- worker Jobs -------------------------------------------------------------------------------
def _target(**worker: Any) -> LaunchTarget:
    return LaunchTarget(
        "kubernetes",
        namespace="ns",
        owner_name="ij",
        owner_uid="uid-1",
        secret_name="db",
        secret_key="dsn",
        worker=WorkerPod(image="i", **worker).model_dump(mode="json"),
    )


G = WorkerGroup("j", 1, "Customer", 2)
B = BatchDispatch("j", "b1", 1, -2, 4, 1)


def test_job_gets_connection_env_and_active_deadline() -> None:
    job = build_wave_job(_target(), "t", G, 1, conn_env=ConnOptions().env(), active_deadline=600)
    assert job["spec"]["activeDeadlineSeconds"] == 600
    env = {e["name"] for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert {"IMPORTWAVES_IDLE_IN_TRANSACTION_TIMEOUT_MS", "IMPORTWAVES_CONNECT_TIMEOUT"} <= env
    spec_deadline = build_wave_job(_target(activeDeadlineSeconds=60), "t", G, 1, active_deadline=9)
    assert spec_deadline["spec"]["activeDeadlineSeconds"] == 60
    assert "activeDeadlineSeconds" not in build_wave_job(_target(), "t", G, 1)["spec"]


def _finished(**changes: Any) -> dict[str, Any]:
    job = build_wave_job(_target(), "t", G, 1)
    job["status"] = {"conditions": [{"type": "Failed", "status": "True", "message": "x" * 5000}]}
    for path, value in changes.items():
        node: Any = job
        *parents, last = path.split("/")
        for p in parents:
            node = node[int(p)] if p.isdigit() else node[p]
        node[last] = value
    return job


def test_read_job_checks_the_controller_uid() -> None:
    r = read_wave_job(_finished(), owner_uid="uid-1")
    assert r is not None and r.failed and r.job_id == "j"
    assert read_wave_job(_finished(), owner_uid="uid-2") is None
    assert read_wave_job(_finished(**{"metadata/ownerReferences": []}), "uid-1") is None
    no_ctl = _finished(**{"metadata/ownerReferences/0/controller": False})
    assert read_wave_job(no_ctl, "uid-1") is None


@pytest.mark.parametrize("index", ["", "x", "1.5", "\u0661", "9" * 40, None])
def test_read_job_refuses_a_bad_index(index: Any) -> None:
    job = _finished()
    job["metadata"]["labels"][LABEL_INDEX] = index
    assert read_wave_job(job, "uid-1") is None


def test_launch_failure_text_is_truncated() -> None:
    f = LaunchFailure(B, "y" * 10_000)
    assert len(f.error) <= MAX_LAUNCH_ERROR and f.error.endswith("(truncated)")


# -- the operator's engine cache ---------------------------------------------------------------
class _FakeEngine(str):
    closed = False

    def close(self) -> None:
        self.closed = True


class _FakeCached:
    def __init__(self, name: str) -> None:
        self.engine: Any = _FakeEngine(name)
        self.registration = self
        self.closed = False

    def close(self) -> None:
        self.closed = True


def _operator(monkeypatch: pytest.MonkeyPatch, dsns: dict[str, str]) -> ImportJobOperator:
    op = ImportJobOperator(Settings(), client.ApiClient())
    monkeypatch.setattr(op, "read_dsn", lambda ns, ref: dsns[ref.secretName])
    return op


def _install_create(
    monkeypatch: pytest.MonkeyPatch, op: ImportJobOperator, gate: threading.Event
) -> list[str]:
    made: list[str] = []

    def create(ns: str, ref: DatabaseRef, tenant: str, dsn: str, fp: str) -> Any:
        if ref.secretName == "slow":
            gate.wait(10)  # a database that does not answer
        made.append(dsn)
        c = _FakeCached(dsn)
        c.fingerprint = fp  # type: ignore[attr-defined]
        return c

    monkeypatch.setattr(op, "_create", create)
    return made


def test_a_slow_tenant_does_not_block_another(monkeypatch: pytest.MonkeyPatch) -> None:
    op = _operator(monkeypatch, {"slow": "postgresql://slow/db", "fast": "postgresql://fast/db"})
    gate = threading.Event()
    _install_create(monkeypatch, op, gate)
    slow = threading.Thread(
        target=op.engine_for, args=("ns", DatabaseRef(secretName="slow"), "a"), daemon=True
    )
    slow.start()
    time.sleep(0.1)  # let it take its key's lock
    t0 = time.monotonic()
    assert op.engine_for("ns", DatabaseRef(secretName="fast"), "b") == "postgresql://fast/db"
    assert time.monotonic() - t0 < 1.0
    assert slow.is_alive()  # still "connecting"
    gate.set()
    slow.join(5)
    assert op.engine_count() == 2


def test_engine_replaced_on_dsn_change_and_evicted_when_finished(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    dsns = {"db": "postgresql://h/db?password=one"}
    monkeypatch.setattr(k8s_operator, "EVICT_GRACE_S", 0.0)
    op = _operator(monkeypatch, dsns)
    made = _install_create(monkeypatch, op, threading.Event())
    ref = DatabaseRef(secretName="db")
    first = op.engine_for("ns", ref, "t", user="ij1")
    assert op.engine_for("ns", ref, "t", user="ij2") == first and len(made) == 1
    old = op._engines[("ns", "db", "dsn", "t")]
    dsns["db"] = "postgresql://h/db?password=two"  # the Secret was rotated
    assert op.engine_for("ns", ref, "t", user="ij1") == "postgresql://h/db?password=two"
    assert old.closed and len(made) == 2  # type: ignore[attr-defined]  (its LISTEN at once)
    wait = time.monotonic() + 5
    while not old.engine.closed and time.monotonic() < wait:  # its pool after the grace
        time.sleep(0.01)
    assert old.engine.closed
    op._settle("ns", "ij1", "Completed")
    assert op.engine_count() == 1  # ij2 still uses it
    op._settle("ns", "ij2", "Running")
    assert op.engine_count() == 1
    op.release("ns", "ij2")  # deleted
    assert op.engine_count() == 0


def test_evicted_engines_close_after_their_grace_on_one_thread(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Many ImportJobs finished (each evicting its engine, re-created by a late worker Job
    event and evicted again): every evicted engine is closed after the grace, and the closes
    wait on one thread, not one thread each (the many-tenants bench had 370 Timer threads)."""
    monkeypatch.setattr(k8s_operator, "EVICT_GRACE_S", 0.5)
    op = _operator(monkeypatch, {"db": "postgresql://h/db"})
    made = _install_create(monkeypatch, op, threading.Event())
    ref = DatabaseRef(secretName="db")
    engines = []
    threads_before = threading.active_count()
    for i in range(200):
        engines.append(op.engine_for("ns", ref, f"t{i % 20}", user=f"ij{i}"))
        op._settle("ns", f"ij{i}", "Completed")
    assert len(made) == 200 and op.engine_count() == 0
    assert threading.active_count() - threads_before <= 1
    assert not any(e.closed for e in engines)  # the grace: work in flight may still use them
    wait = time.monotonic() + 10
    while not all(e.closed for e in engines) and time.monotonic() < wait:
        time.sleep(0.02)
    assert all(e.closed for e in engines)
    op.close()


def test_closing_the_operator_closes_the_evicted_engines_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(k8s_operator, "EVICT_GRACE_S", 600.0)
    op = _operator(monkeypatch, {"db": "postgresql://h/db"})
    _install_create(monkeypatch, op, threading.Event())
    ref = DatabaseRef(secretName="db")
    evicted = op.engine_for("ns", ref, "t", user="ij1")
    op.release("ns", "ij1")
    kept = op.engine_for("ns", ref, "t2", user="ij2")
    assert not evicted.closed
    op.close()
    assert evicted.closed
    assert op.engine_count() == 0 and kept is not None


def test_a_failed_key_answers_from_memory_for_a_moment(monkeypatch: pytest.MonkeyPatch) -> None:
    op = _operator(monkeypatch, {"db": "postgresql://h/db"})
    calls: list[int] = []

    def create(*a: Any) -> Any:
        calls.append(1)
        raise ProblemError(Problem(ProblemKind.DATABASE_TIMEOUT, "timed out"))

    monkeypatch.setattr(op, "_create", create)
    for _ in range(3):
        with pytest.raises(ProblemError):
            op.engine_for("ns", DatabaseRef(secretName="db"), "t")
    assert calls == [1]
    monkeypatch.setattr(k8s_operator, "FAILURE_HOLD_S", 0.0)
    op._failures.clear()
    with pytest.raises(ProblemError):
        op.engine_for("ns", DatabaseRef(secretName="db"), "t")
    assert calls == [1, 1]


# -- the timer's filter ------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("summary", "annotations", "handled", "polled"),
    [
        ("Running", {}, {}, True),
        ("Completed", {}, {}, False),
        ("Failed", {}, {}, False),
        ("Failed", {"importwaves.io/retry-failed": "fix-1"}, {}, True),
        (
            "Failed",
            {"importwaves.io/retry-failed": "fix-1"},
            {"handledRetryFailed": "fix-1"},
            False,
        ),
        ("Completed", {"importwaves.io/reconcile": "r1"}, {"handledReconcile": "r0"}, True),
    ],
)
def test_the_timer_skips_finished_importjobs_unless_an_annotation_waits(
    summary: str, annotations: dict[str, str], handled: dict[str, str], polled: bool
) -> None:
    assert needs_polling({"summary": summary, **handled}, annotations) is polled


@pytest.mark.parametrize(
    ("status", "last", "now", "due"),
    [
        ({}, None, 0.0, True),  # never ticked
        ({"heldBatches": 0, "activeBatches": 2}, 100.0, 101.0, True),  # running: every tick
        ({"heldBatches": 3, "activeBatches": 1}, 100.0, 101.0, True),  # held, but runs some
        ({"heldBatches": 3, "activeBatches": 0}, 100.0, 101.0, False),  # only waiting
        ({"heldBatches": 3}, 100.0, 100.0 + WAITING_BACKSTOP_S - 0.1, False),
        ({"heldBatches": 3}, 100.0, 100.0 + WAITING_BACKSTOP_S, True),  # the backstop
        ({"heldBatches": 3, "activeBatches": 0}, None, 5.0, True),
    ],
)
def test_the_timer_looks_at_an_importjob_waiting_for_capacity_only_as_a_backstop(
    status: dict[str, int], last: float | None, now: float, due: bool
) -> None:
    assert timer_due(status, last, now, 10.0) is due
    # never less often than the interval itself
    assert timer_due({"heldBatches": 1}, 0.0, 100.0, 120.0) is False
    assert timer_due({"heldBatches": 1}, 0.0, 120.0, 120.0) is True


@pytest.mark.parametrize(
    ("conditions", "finished"),
    [
        (None, False),
        ([], False),
        ([{"type": "Complete", "status": "True"}], True),
        ([{"type": "Failed", "status": "True"}], True),
        ([{"type": "Complete", "status": "False"}], False),
        ([{"type": "SuccessCriteriaMet", "status": "True"}], False),  # Complete follows it
        (["junk", {"type": "Suspended", "status": "True"}], False),
    ],
)
def test_a_worker_job_has_ended_only_once_complete_or_failed(
    conditions: list[Any] | None, finished: bool
) -> None:
    r = read_wave_job(_finished(**{"status/conditions": conditions}), "uid-1")
    assert r is not None and r.finished is finished
    r = read_wave_job(_finished(status={}), "uid-1")
    assert r is not None and r.finished is False
