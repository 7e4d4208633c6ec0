"""Connection options every tenant connection sets: timeouts and TCP keepalives.

A tenant database is a stranger: it may be slow, unreachable, or answer nothing at all. Every
connection this project opens (engine pools, the worker's connections, LISTEN connections, the
migration connection) bounds how long it can wait: to connect (`connect_timeout`), for one
statement (`statement_timeout`), for a lock (`lock_timeout`), and how long its session may sit
idle inside a transaction (`idle_in_transaction_session_timeout`, so a worker stopped mid-
transaction releases its batch row); TCP keepalives and `tcp_user_timeout` find a dead peer in
about a minute instead of the kernel's hours. Defaults are in settings.py (and the README).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

#: Environment variable names (the operator's settings and the worker read the same ones).
ENV_PREFIX = "IMPORTWAVES_"


@dataclass(frozen=True)
class ConnOptions:
    connect_timeout: int = 5
    statement_timeout_ms: int = 300_000
    lock_timeout_ms: int = 30_000
    idle_in_transaction_timeout_ms: int = 60_000
    keepalives_idle: int = 30
    keepalives_interval: int = 10
    keepalives_count: int = 3
    tcp_user_timeout_ms: int = 60_000

    def kwargs(self, *, connect_timeout: int | None = None) -> dict[str, Any]:
        """libpq connection parameters (psycopg.connect / ConnectionPool kwargs)."""
        opts = (
            f"-c statement_timeout={int(self.statement_timeout_ms)}"
            f" -c lock_timeout={int(self.lock_timeout_ms)}"
            f" -c idle_in_transaction_session_timeout={int(self.idle_in_transaction_timeout_ms)}"
        )
        return {
            "connect_timeout": max(1, int(connect_timeout or self.connect_timeout)),
            "options": opts,
            "keepalives": 1,
            "keepalives_idle": int(self.keepalives_idle),
            "keepalives_interval": int(self.keepalives_interval),
            "keepalives_count": int(self.keepalives_count),
            "tcp_user_timeout": int(self.tcp_user_timeout_ms),
        }

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> ConnOptions:
        """The options from IMPORTWAVES_* variables (defaults for those unset or empty)."""
        src = os.environ if env is None else env
        d = cls()

        def get(name: str, default: int) -> int:
            raw = src.get(ENV_PREFIX + name, "")
            try:
                return int(raw) if raw.strip() else default
            except ValueError:
                return default

        return cls(
            connect_timeout=get("CONNECT_TIMEOUT", d.connect_timeout),
            statement_timeout_ms=get("STATEMENT_TIMEOUT_MS", d.statement_timeout_ms),
            lock_timeout_ms=get("LOCK_TIMEOUT_MS", d.lock_timeout_ms),
            idle_in_transaction_timeout_ms=get(
                "IDLE_IN_TRANSACTION_TIMEOUT_MS", d.idle_in_transaction_timeout_ms
            ),
            keepalives_idle=get("KEEPALIVES_IDLE", d.keepalives_idle),
            keepalives_interval=get("KEEPALIVES_INTERVAL", d.keepalives_interval),
            keepalives_count=get("KEEPALIVES_COUNT", d.keepalives_count),
            tcp_user_timeout_ms=get("TCP_USER_TIMEOUT_MS", d.tcp_user_timeout_ms),
        )

    def env(self) -> dict[str, str]:
        """The same options as IMPORTWAVES_* variables (for worker processes and pods)."""
        return {
            ENV_PREFIX + "CONNECT_TIMEOUT": str(self.connect_timeout),
            ENV_PREFIX + "STATEMENT_TIMEOUT_MS": str(self.statement_timeout_ms),
            ENV_PREFIX + "LOCK_TIMEOUT_MS": str(self.lock_timeout_ms),
            ENV_PREFIX + "IDLE_IN_TRANSACTION_TIMEOUT_MS": str(self.idle_in_transaction_timeout_ms),
            ENV_PREFIX + "KEEPALIVES_IDLE": str(self.keepalives_idle),
            ENV_PREFIX + "KEEPALIVES_INTERVAL": str(self.keepalives_interval),
            ENV_PREFIX + "KEEPALIVES_COUNT": str(self.keepalives_count),
            ENV_PREFIX + "TCP_USER_TIMEOUT_MS": str(self.tcp_user_timeout_ms),
        }


DEFAULT = ConnOptions()
