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
    REFUSED = "DatabaseRefused"
    UNRESOLVED = "DatabaseHostUnknown"
    AUTH = "DatabaseAuthFailed"
    UNREACHABLE = "DatabaseUnreachable"


_WORDS = {
    DsnProblem.MALFORMED: "the DSN is not a valid PostgreSQL connection string (check its "
    "quoting and percent-encoding)",
    DsnProblem.TIMEOUT: "the connection timed out (connect_timeout, statement_timeout or "
    "lock_timeout expired, or the server stopped answering)",
    DsnProblem.REFUSED: "the connection was refused (nothing listens on that host and port)",
    DsnProblem.UNRESOLVED: "the DSN names a host that does not resolve",
    DsnProblem.AUTH: "the connection was rejected: authentication failed or the role or "
    "database does not exist",
    DsnProblem.UNREACHABLE: "the connection failed (the server is unreachable or closed the "
    "connection)",
}


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
    if isinstance(exc, psycopg.errors.ConnectionTimeout | psycopg.errors.QueryCanceled):
        return DsnProblem.TIMEOUT
    if isinstance(exc, psycopg.errors.LockNotAvailable):
        return DsnProblem.TIMEOUT
    if isinstance(exc, psycopg.ProgrammingError | psycopg.InterfaceError) and not isinstance(
        exc, psycopg.OperationalError
    ):
        return DsnProblem.MALFORMED
    if isinstance(exc, _AUTH_ERRORS):
        return DsnProblem.AUTH
    text = str(exc).lower()
    if "timeout" in text or "timed out" in text:
        return DsnProblem.TIMEOUT
    if "password authentication failed" in text or "does not exist" in text:
        return DsnProblem.AUTH
    if "failed to resolve host" in text or "could not translate host name" in text:
        return DsnProblem.UNRESOLVED
    if "refused" in text:
        return DsnProblem.REFUSED
    if "invalid" in text and ("conninfo" in text or "connection" in text or "token" in text):
        return DsnProblem.MALFORMED
    return DsnProblem.UNREACHABLE


def describe(exc: BaseException, source: str) -> Described:
    """`<source>: <the kind of problem>`: `source` says where the DSN came from (e.g. "the
    tenant database in Secret ns/name key 'dsn'"); psycopg's text is never included."""
    kind = classify(exc)
    return Described(kind, f"{source}: {_WORDS[kind]} ({type(exc).__name__})")


def check_dsn(dsn: str, source: str) -> None:
    """Raise ValueError (with a message naming `source` and no secret) if `dsn` cannot be parsed
    as a connection string; the parse happens before any connection is tried."""
    from psycopg.conninfo import conninfo_to_dict

    try:
        conninfo_to_dict(dsn)
    except psycopg.Error as exc:
        raise ValueError(describe(exc, source).message) from None
