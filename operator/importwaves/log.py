"""Structured logs: one JSON object a line, with the fields the seed design asks for.

Call `event(logger, "derived_dispatched", job_id=..., wave_number=..., batch_count=...)`; the
event name and fields become top-level keys next to time, level and logger.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any

from importwaves import redact

_RESERVED = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}
#: Extras kopf attaches to its per-object records that are no use in a log line (`settings` is
#: the whole OperatorSettings object: ~2.5 kB of repr on every handler line).
_DROPPED = {"settings", "k8s_skip"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _RESERVED and key not in _DROPPED and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        # the last line of defence: no remembered DSN or password leaves in a log line
        return redact.scrub(json.dumps(out, default=str, separators=(",", ":")))


def setup(level: str | int = "INFO", stream: Any = None) -> None:
    """Send every importwaves and kopf log line to `stream` (stderr) as JSON."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    for name in ("importwaves", "kopf"):
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.setLevel(level)
        logger.propagate = False
    # psycopg_pool reports background connection errors itself: as JSON too (and so scrubbed)
    pool_logger = logging.getLogger("psycopg")
    pool_logger.handlers[:] = [handler]
    pool_logger.setLevel(logging.WARNING)
    pool_logger.propagate = False


def event(logger: logging.Logger, name: str, level: int = logging.INFO, **fields: Any) -> None:
    """Log one structured event; `name` is both the message and the `event` field."""
    if logger.isEnabledFor(level):
        exc_info = fields.pop("exc_info", None)
        extra = {(k if k not in _RESERVED else f"{k}_field"): v for k, v in fields.items()}
        logger.log(level, name, extra={"event": name, **extra}, exc_info=exc_info, stacklevel=2)


def events_named(text: str, name: str) -> list[dict[str, Any]]:
    """The records with `"event": name` in a log this module wrote (other lines are skipped)."""
    out = []
    for line in text.splitlines():
        if f'"{name}"' not in line:
            continue
        with contextlib.suppress(ValueError):
            rec = json.loads(line)
            if isinstance(rec, dict) and rec.get("event") == name:
                out.append(rec)
    return out
