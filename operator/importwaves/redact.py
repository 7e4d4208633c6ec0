"""No secret in any message: the one place that turns a database error into words.

psycopg's errors quote what they were given: a malformed DSN comes back as
`invalid percent-encoded token: "S3cr%zzet"`, a bad option as the option's text. So an error
about a tenant's database is never shown as psycopg wrote it: `describe` names WHERE the DSN came
from (a Secret and key, an environment variable) and the KIND of problem (malformed, timed out,
refused, authentication failed, ...), nothing else. For free text that may still carry a secret
(a worker's recorded error, a log line, a traceback), `scrub` removes every DSN, password and
`password=` value this process has seen (`remember`) or can spot by its shape; the JSON log
formatter runs every line through it as a last line of defence.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from enum import StrEnum
from urllib.parse import unquote

import psycopg
import psycopg.errors

MASK = "***"

#: Secrets shorter than this are not searched for in free text (a one-letter password would
#: mask every such letter); `describe` never shows psycopg's text, so nothing depends on it.
_MIN_SECRET = 4

_URL_USERINFO = re.compile(r"(?i)\b(postgres(?:ql)?://)[^\s\"'@/]*@")
_URL_ANY = re.compile(r"(?i)\bpostgres(?:ql)?://[^\s\"']*")
_KV_PASSWORD = re.compile(r"(?i)\b(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)")

_lock = threading.Lock()
_secrets: set[str] = set()


class DsnProblem(StrEnum):
    """The kind of problem with a tenant database, as a condition reason."""

    MALFORMED = "InvalidDSN"
    TIMEOUT = "DatabaseTimeout"
    AUTH = "DatabaseAuthFailed"
    UNREACHABLE = "DatabaseUnreachable"


_WORDS = {
    DsnProblem.MALFORMED: "the DSN is not a valid PostgreSQL connection string (check its "
    "quoting and percent-encoding)",
    DsnProblem.TIMEOUT: "the connection timed out (connect_timeout, statement_timeout or "
    "lock_timeout expired, or the server stopped answering)",
    DsnProblem.AUTH: "the server rejected the connection (authentication failed, or the role "
    "or database does not exist)",
    DsnProblem.UNREACHABLE: "the database is unreachable",
}

#: What an unreachable database's error says, in words of our own (never its text).
_UNREACHABLE_DETAIL = (
    (("failed to resolve host", "could not translate host name"), "its host does not resolve"),
    (("refused",), "the connection was refused: nothing listens on that host and port"),
    (("closed the connection", "terminat", "eof"), "the server closed the connection"),
    (("couldn't get a connection",), "no connection could be opened in time"),
)


@dataclass(frozen=True)
class Described:
    kind: DsnProblem
    message: str


def passwords_in(dsn: str) -> list[str]:
    """The password(s) written in a DSN, raw and percent-decoded, found by shape only (the DSN
    may be malformed, so it is not parsed by libpq)."""
    found: list[str] = []
    m = re.match(r"(?i)^\s*postgres(?:ql)?://([^/?#]*)", dsn)
    if m:
        userinfo = m.group(1).rpartition("@")[0]
        if ":" in userinfo:
            found.append(userinfo.partition(":")[2])
    for kv in _KV_PASSWORD.finditer(dsn):
        found.append(kv.group(2).strip("'"))
    for qs in re.finditer(r"(?i)[?&]password=([^&#\s]*)", dsn):
        found.append(qs.group(1))
    out: list[str] = []
    for p in found:
        for v in (p, _unquote(p)):
            if v and v not in out:
                out.append(v)
    return out


def _unquote(text: str) -> str:
    try:
        return unquote(text, errors="strict")
    except (UnicodeDecodeError, ValueError):
        return text


def remember(dsn: str) -> None:
    """Note a DSN (and its password) so `scrub` removes it from any text this process writes."""
    values = [dsn.strip(), *passwords_in(dsn)]
    with _lock:
        _secrets.update(v for v in values if len(v) >= _MIN_SECRET)


def scrub(text: str, *extra: str) -> str:
    """`text` without any remembered secret, any of `extra` (DSNs or passwords) and anything
    shaped like a DSN's credentials."""
    if not text:
        return text
    with _lock:
        secrets = set(_secrets)
    for e in extra:
        if e:
            secrets.update(v for v in (e.strip(), *passwords_in(e)) if len(v) >= _MIN_SECRET)
    for s in sorted(secrets, key=len, reverse=True):
        if s in text:
            text = text.replace(s, MASK)
    text = _URL_USERINFO.sub(lambda m: f"{m.group(1)}{MASK}@", text)
    return _KV_PASSWORD.sub(lambda m: f"{m.group(1)}{MASK}", text)


_AUTH_ERRORS = (
    psycopg.errors.InvalidAuthorizationSpecification,
    psycopg.errors.InvalidPassword,
    psycopg.errors.InvalidCatalogName,
)


def classify(exc: BaseException) -> DsnProblem:
    """The kind of a connection error, from its type and (never shown) text."""
    if isinstance(
        exc,
        psycopg.errors.ConnectionTimeout
        | psycopg.errors.QueryCanceled
        | psycopg.errors.LockNotAvailable,
    ):
        return DsnProblem.TIMEOUT
    if isinstance(exc, psycopg.ProgrammingError | psycopg.InterfaceError) and not isinstance(
        exc, psycopg.OperationalError
    ):
        return DsnProblem.MALFORMED
    if isinstance(exc, _AUTH_ERRORS):
        return DsnProblem.AUTH
    text = str(exc).lower()
    if "timeout expired" in text or "timed out" in text:
        return DsnProblem.TIMEOUT
    if "fatal:" in text and (
        "authentication failed" in text or "does not exist" in text or "no pg_hba" in text
    ):
        return DsnProblem.AUTH
    if "invalid" in text and ("conninfo" in text or "connection string" in text):
        return DsnProblem.MALFORMED
    return DsnProblem.UNREACHABLE


def server_reason(exc: BaseException, *secrets: str) -> str | None:
    """What the SERVER said when it refused a connection (`FATAL: role "x" does not exist`):
    PostgreSQL's own words, which never contain the password; scrubbed all the same."""
    m = re.search(r"FATAL:\s+([^\n]*)", str(exc))
    return scrub(m.group(1).strip(), *secrets)[:300] if m else None


def describe(exc: BaseException, source: str, *secrets: str) -> Described:
    """`<source>: <the kind of problem>`: `source` says where the DSN came from (e.g. "the
    tenant database in Secret ns/name key 'dsn'"); psycopg's text is never included (only the
    server's reason for refusing a connection, from `server_reason`). `secrets`: the DSN, so
    that even that reason is scrubbed of it."""
    kind = classify(exc)
    words = _WORDS[kind]
    if kind is DsnProblem.AUTH:
        said = server_reason(exc, *secrets)
        if said:
            words += f"; the server said: {said}"
    elif kind is DsnProblem.UNREACHABLE:
        text = str(exc).lower()
        for needles, detail in _UNREACHABLE_DETAIL:
            if any(n in text for n in needles):
                words += f": {detail}"
                break
    return Described(kind, f"{source}: {words} ({type(exc).__name__})")


def check_dsn(dsn: str, source: str) -> None:
    """Raise ValueError (with a message naming `source` and no secret) if `dsn` cannot be parsed
    as a connection string; the parse happens before any connection is tried."""
    from psycopg.conninfo import conninfo_to_dict

    try:
        conninfo_to_dict(dsn)
    except psycopg.Error as exc:
        raise ValueError(describe(exc, source).message) from None
