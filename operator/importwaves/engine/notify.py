"""Completion notifications: one LISTEN connection per database, one channel per tenant.

The reference worker NOTIFYs its tenant's channel (`channel_for(tenant)`) inside its completion
transaction, so the notification arrives exactly when the completion commits — before the worker
process exits, before a pod's status reaches the Job controller. It is only a prompt to look at
the database: a lost notification (listener down, connection dropped, a worker in another
language) changes nothing, because process exits, Job events and the timer still end in the same
idempotent reconcile; and a forged one (PostgreSQL checks no privilege on NOTIFY) only makes the
engine look.

Many tenants often share one database (one schema each). A `NotifyHub` per database identity
(host, port, database, user) holds ONE connection that LISTENs on the channel of every tenant
registered with it and routes each payload to that tenant's handler; `HUBS` is the process's
registry. A hub closes its connection `LINGER_S` seconds after its last tenant left (a tenant
of the same database registering meanwhile reuses it), and a new hub of a database waits for
the previous one's connection to close: one LISTEN connection per database at any instant.
Payloads are parsed defensively: one that is not JSON, lacks a field, has the wrong type, or
names another tenant than its channel is dropped.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

from importwaves import redact
from importwaves.db.options import DEFAULT, ConnOptions
from importwaves.log import event

log = logging.getLogger("importwaves.notify")

#: The database-wide channel of earlier versions; nothing listens on it any more.
LEGACY_CHANNEL = "importwaves"
_CHANNEL_PREFIX = "importwaves_"
#: Longest payload accepted (a completion is ~120 bytes; PostgreSQL allows 8000).
MAX_PAYLOAD = 1024


def channel_for(tenant: str) -> str:
    """The tenant's NOTIFY channel (tenant names are at most 48 lowercase characters, so this
    fits PostgreSQL's 63-byte identifiers; it is always passed as an identifier or parameter)."""
    return f"{_CHANNEL_PREFIX}{tenant}"


@dataclass(frozen=True)
class Completion:
    tenant: str
    job_id: str
    batch_id: str
    dispatch_seq: int


#: Kinds of prompt (a payload's "kind"; a completion has none): batches were dispatched (pooled
#: workers try to claim), a job's status changed, a worker recorded a failed attempt.
PROMPT_KINDS = frozenset({"dispatched", "status", "failed"})


def prompt_payload(kind: str, tenant: str, job_id: str) -> str:
    """The NOTIFY payload of a prompt that is not a completion (see PROMPT_KINDS)."""
    return json.dumps({"kind": kind, "tenant": tenant, "job_id": job_id}, separators=(",", ":"))


@dataclass(frozen=True)
class Prompt:
    kind: str
    tenant: str
    job_id: str


def parse_prompt(payload: str) -> Prompt | None:
    """A prompt payload (see prompt_payload), or None for anything else (never raises)."""
    data = _load(payload)
    if data is None:
        return None
    kind, tenant, job_id = data.get("kind"), data.get("tenant"), data.get("job_id")
    if kind not in PROMPT_KINDS:
        return None
    if not all(isinstance(v, str) and v for v in (tenant, job_id)):
        return None
    return Prompt(str(kind), str(tenant), str(job_id))


#: The prompts a job's pooled worker waits for: something it may claim was dispatched, or its
#: job's status changed (it may have to exit).
WORKER_PROMPTS = frozenset({"dispatched", "status"})


def prompts_worker(payload: str, job_id: str) -> bool:
    """Whether a notice on the tenant's channel is for `job_id`'s pooled workers (see
    WORKER_PROMPTS). Completion notices are the engine's: a worker woken by each of them, with
    nothing to claim, spent a claim round trip per completion per idle worker, in the moment the
    engine's run of that completion needs the CPU (the derived dispatch lag's path). A worker
    that misses a prompt finds the work at its next poll: prompts are never the record."""
    prompt = parse_prompt(payload)
    return prompt is not None and prompt.job_id == job_id and prompt.kind in WORKER_PROMPTS


def _load(payload: str) -> dict[str, Any] | None:
    if not isinstance(payload, str) or len(payload) > MAX_PAYLOAD:
        return None
    try:
        data = json.loads(payload)
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def parse(payload: str) -> Completion | None:
    """A completion payload, or None for anything else (never raises)."""
    data = _load(payload)
    if data is None or "kind" in data:
        return None
    tenant, job_id, batch_id, seq = (
        data.get("tenant"),
        data.get("job_id"),
        data.get("batch_id"),
        data.get("dispatch_seq"),
    )
    if not all(isinstance(v, str) and v for v in (tenant, job_id, batch_id)):
        return None
    if isinstance(seq, bool) or not isinstance(seq, int) or seq < 0:
        return None
    return Completion(str(tenant), str(job_id), str(batch_id), seq)


@dataclass(frozen=True)
class DatabaseIdentity:
    host: str
    port: str
    dbname: str
    user: str

    def __str__(self) -> str:  # no password: host, port, database and role only
        return f"{self.user}@{self.host}:{self.port}/{self.dbname}"


def database_identity(dsn: str) -> DatabaseIdentity:
    """Which database (and role) a DSN connects to; ValueError (no secret) if it is malformed."""
    try:
        d = conninfo_to_dict(dsn)
    except psycopg.Error as exc:
        raise ValueError(redact.describe(exc, "the DSN").message) from None
    return DatabaseIdentity(
        str(d.get("host") or d.get("hostaddr") or "localhost"),
        str(d.get("port") or "5432"),
        str(d.get("dbname") or d.get("user") or ""),
        str(d.get("user") or ""),
    )


def fingerprint(dsn: str) -> str:
    """A short digest of a DSN, to notice that it changed without keeping or logging it."""
    return hashlib.sha256(dsn.encode()).hexdigest()[:16]


Handler = Callable[[Completion], object]


class NotifyHub:
    """A daemon thread holding one LISTEN connection to one database for all its tenants.
    Registrations take effect between polls; reconnects with back-off; `stop()` ends it."""

    def __init__(
        self,
        identity: DatabaseIdentity,
        dsn: str,
        *,
        opts: ConnOptions = DEFAULT,
        poll: float = 0.2,
        max_backoff: float = 30.0,
    ) -> None:
        self.identity = identity
        self.dsn = dsn
        self.opts = opts
        self.poll = poll
        self.max_backoff = max_backoff
        self.received = 0
        self._handlers: dict[str, dict[int, Handler]] = {}
        self._tokens = itertools.count(1)
        self._lock = threading.Lock()
        self._changed = threading.Event()
        self._listening: set[str] = set()
        self._synced = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name=f"notify-{identity.dbname}", daemon=True
        )
        self._started = False

    # -- registrations ---------------------------------------------------------------------------
    def add(self, tenant: str, handler: Handler, dsn: str | None = None) -> int:
        with self._lock:
            token = next(self._tokens)
            self._handlers.setdefault(tenant, {})[token] = handler
            if dsn:
                self.dsn = dsn  # the newest credentials for the same database: used on reconnect
            if not self._started:
                self._started = True
                self._thread.start()
        self._changed.set()
        return token

    def remove(self, tenant: str, token: int) -> int:
        """Drop one registration; returns how many tenants remain."""
        with self._lock:
            handlers = self._handlers.get(tenant, {})
            handlers.pop(token, None)
            if not handlers:
                self._handlers.pop(tenant, None)
            left = len(self._handlers)
        self._changed.set()
        return left

    def tenants(self) -> set[str]:
        with self._lock:
            return set(self._handlers)

    def is_listening(self, tenant: str) -> bool:
        with self._synced:
            return tenant in self._listening

    def wait_listening(self, tenant: str, timeout: float) -> bool:
        with self._synced:
            return self._synced.wait_for(lambda: tenant in self._listening, timeout)

    def stop(self) -> None:
        self._stop.set()
        self._changed.set()
        if self._started:
            self._thread.join(timeout=self.poll * 4 + self.opts.connect_timeout + 5)

    # -- the thread ------------------------------------------------------------------------------
    def _run(self) -> None:
        backoff = 0.5
        while not self._stop.is_set():
            try:
                with psycopg.connect(self.dsn, autocommit=True, **self.opts.kwargs()) as conn:
                    self._set_listening(set())
                    backoff = 0.5
                    while not self._stop.is_set():
                        self._sync(conn)
                        for n in conn.notifies(timeout=self.poll):
                            self._deliver(n.channel, n.payload)
                            if self._changed.is_set():
                                break
            except psycopg.Error as exc:
                self._set_listening(set())
                event(
                    log,
                    "notify_listener_reconnecting",
                    logging.WARNING,
                    database=str(self.identity),
                    error=redact.describe(exc, "the LISTEN connection").message,
                    retry_in=backoff,
                )
                self._stop.wait(backoff)
                backoff = min(self.max_backoff, backoff * 2)
        self._set_listening(set())

    def _sync(self, conn: psycopg.Connection[Any]) -> None:
        self._changed.clear()
        want = self.tenants()
        with self._synced:
            have = set(self._listening)
        for tenant in sorted(want - have):
            conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel_for(tenant))))
        for tenant in sorted(have - want):
            conn.execute(sql.SQL("UNLISTEN {}").format(sql.Identifier(channel_for(tenant))))
        self._set_listening(want)

    def _set_listening(self, tenants: set[str]) -> None:
        with self._synced:
            self._listening = set(tenants)
            self._synced.notify_all()

    def _deliver(self, channel: str, payload: str) -> None:
        if not channel.startswith(_CHANNEL_PREFIX):
            return
        tenant = channel[len(_CHANNEL_PREFIX) :]
        c = parse(payload)
        if c is None or c.tenant != tenant:
            return
        with self._lock:
            handlers = list(self._handlers.get(tenant, {}).values())
        for handle in handlers:
            self.received += 1
            try:
                handle(c)
            except Exception:  # a prompt that failed is retried by the level-based paths
                event(
                    log,
                    "notify_handler_failed",
                    logging.ERROR,
                    tenant=tenant,
                    job_id=c.job_id,
                    batch_id=c.batch_id,
                    exc_info=True,
                )


#: Seconds a hub whose last tenant left keeps its connection for the next tenant of its
#: database (an operator evicts a finished import's engine and creates another tenant's a
#: moment later: without it, the new hub's connection opened while the old one closed).
LINGER_S = 5.0
#: Longest wait for a stopping hub of the same database before starting the next one.
STOP_WAIT_S = 30.0


class Hubs:
    """The process's hubs, one per database identity. A hub whose last tenant left lingers
    `linger` seconds (the next tenant of its database reuses its connection), then stops; a
    tenant registering while it stops waits for it, so a database never has two of this
    process's LISTEN connections at once."""

    def __init__(self, linger: float = LINGER_S) -> None:
        self.linger = linger
        self._hubs: dict[DatabaseIdentity, NotifyHub] = {}
        #: hubs being stopped, each set once its connection is closed
        self._stopping: dict[DatabaseIdentity, threading.Event] = {}
        #: the linger timer of each hub without tenants
        self._timers: dict[DatabaseIdentity, threading.Timer] = {}
        self._lock = threading.Lock()

    def register(
        self,
        dsn: str,
        tenant: str,
        handler: Handler,
        *,
        opts: ConnOptions = DEFAULT,
        poll: float = 0.2,
    ) -> Registration:
        identity = database_identity(dsn)
        while True:
            with self._lock:
                stopping = self._stopping.get(identity)
                if stopping is None:
                    timer = self._timers.pop(identity, None)
                    if timer is not None:
                        timer.cancel()  # a lingering hub: reused
                    hub = self._hubs.get(identity)
                    if hub is None:
                        hub = self._hubs[identity] = NotifyHub(identity, dsn, opts=opts, poll=poll)
                    token = hub.add(tenant, handler, dsn)
                    return Registration(self, hub, tenant, token)
            stopping.wait(STOP_WAIT_S)  # its connection closes first

    def _release(self, reg: Registration) -> None:
        identity = reg.hub.identity
        with self._lock:
            left = reg.hub.remove(reg.tenant, reg.token)
            if left or self._hubs.get(identity) is not reg.hub:
                return
            if self.linger > 0:
                old = self._timers.pop(identity, None)
                if old is not None:
                    old.cancel()
                timer = threading.Timer(self.linger, self._expire, args=(reg.hub,))
                timer.daemon = True
                timer.name = f"notify-linger-{identity.dbname}"
                self._timers[identity] = timer
                timer.start()
                return
            done = self._unlist(reg.hub)
        self._stop(reg.hub, done)

    def _expire(self, hub: NotifyHub) -> None:
        """A linger timer ran out: stop the hub unless a tenant came back meanwhile."""
        with self._lock:
            if (
                self._timers.get(hub.identity) is not threading.current_thread()
                or self._hubs.get(hub.identity) is not hub
                or hub.tenants()
            ):
                return
            del self._timers[hub.identity]
            done = self._unlist(hub)
        self._stop(hub, done)

    def _unlist(self, hub: NotifyHub) -> threading.Event:
        """(under the lock) `hub` leaves the registry and is marked stopping."""
        del self._hubs[hub.identity]
        done = self._stopping[hub.identity] = threading.Event()
        return done

    def _stop(self, hub: NotifyHub, done: threading.Event) -> None:
        try:
            hub.stop()
        finally:
            with self._lock:
                if self._stopping.get(hub.identity) is done:
                    del self._stopping[hub.identity]
            done.set()

    def stop_idle(self) -> int:
        """Stop now every hub without tenants (lingering); returns how many."""
        with self._lock:
            idle = [h for h in self._hubs.values() if not h.tenants()]
            stops = []
            for hub in idle:
                timer = self._timers.pop(hub.identity, None)
                if timer is not None:
                    timer.cancel()
                stops.append((hub, self._unlist(hub)))
        for hub, done in stops:
            self._stop(hub, done)
        return len(stops)

    def count(self) -> int:
        with self._lock:
            return len(self._hubs)

    def hub_for(self, dsn: str) -> NotifyHub | None:
        with self._lock:
            return self._hubs.get(database_identity(dsn))


@dataclass
class Registration:
    hubs: Hubs
    hub: NotifyHub
    tenant: str
    token: int
    _closed: bool = False

    @property
    def listening(self) -> bool:
        return self.hub.is_listening(self.tenant)

    def wait(self, timeout: float = 5.0) -> bool:
        return self.hub.wait_listening(self.tenant, timeout)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.hubs._release(self)


#: The process-wide registry (the operator's engines and the local runner share it).
HUBS = Hubs()


class CompletionListener:
    """One tenant's completions, through the shared hub of its database (`HUBS`)."""

    def __init__(
        self,
        dsn: str,
        tenant: str,
        handle: Handler,
        *,
        poll: float = 0.2,
        opts: ConnOptions = DEFAULT,
        hubs: Hubs | None = None,
    ) -> None:
        self.dsn, self.tenant, self.handle = dsn, tenant, handle
        self.poll, self.opts = poll, opts
        self.hubs = hubs or HUBS
        self._reg: Registration | None = None

    def start(self, wait: float = 5.0) -> CompletionListener:
        self._reg = self.hubs.register(
            self.dsn, self.tenant, self.handle, opts=self.opts, poll=self.poll
        )
        self._reg.wait(wait)
        return self

    def stop(self) -> None:
        if self._reg is not None:
            self._reg.close()

    @property
    def listening(self) -> bool:
        return self._reg is not None and self._reg.listening
