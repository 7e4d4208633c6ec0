"""Stop a coordinator run between its steps (to kill its connection or its process there).

`install_pause(engine, point)` makes the engine's next coordinator run stop at `point` and wait
until released (or until its process is killed):

    locked     the run's first round trip is back: the job row is locked (a listener run's
               batch reads are done), nothing is committed yet;
    decided    the decision is made and its writes are about to be sent: the dispatches (new
               fencing tokens), the job status, the prompt and the COMMIT travel in one round
               trip (`Coordinator._dispatch`), so no client-side moment lies between them; the
               transaction is open, holding the job lock;
    committed  the transaction committed; no worker sync has run, no flag is set yet.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from importwaves.db.connect import Conn
from importwaves.engine.app import Engine
from importwaves.launch.base import BatchDispatch
from importwaves.spec import ImportSpec

POINTS = ("locked", "decided", "committed")


class Pause:
    """One coordinator run stopped at `point`; `release` lets it go on."""

    def __init__(self, point: str, timeout: float = 30.0) -> None:
        assert point in POINTS, point
        self.point = point
        self.timeout = timeout
        self.reached = threading.Event()
        self.release = threading.Event()
        self.backend_pid: int | None = None
        self.on_reached: Callable[[Pause], None] | None = None

    def hit(self, point: str) -> None:
        if point != self.point or self.reached.is_set():
            return
        self.reached.set()
        if self.on_reached is not None:
            self.on_reached(self)
        self.release.wait(self.timeout)


def install_pause(engine: Engine, pause: Pause) -> Callable[[], None]:
    """Make the engine's coordinator runs stop at `pause.point`; returns an uninstaller."""
    coord = engine.coordinator
    orig_check = coord.check_and_trigger_next_wave
    orig_dispatch = coord._dispatch
    orig_dispatched = coord.on_dispatched

    def check(job_id: str, cause: str = "nudge", **kw: Any) -> Any:
        inner = kw.pop("prepare", None)

        def prepare(conn: Conn, spec: ImportSpec) -> Callable[[], None]:
            # sent in the run's first round trip (with the job lock); its reader runs after it
            read = inner(conn, spec) if inner is not None else None
            pause.backend_pid = conn.info.backend_pid

            def finish() -> None:
                if read is not None:
                    read()
                pause.hit("locked")

            return finish

        return orig_check(job_id, cause, prepare=prepare, **kw)

    def dispatch(*args: Any, **kw: Any) -> Any:
        pause.hit("decided")
        return orig_dispatch(*args, **kw)

    def dispatched(job_id: str, spec: ImportSpec, batches: list[BatchDispatch], **kw: Any) -> None:
        pause.hit("committed")
        if orig_dispatched is not None:
            orig_dispatched(job_id, spec, batches, **kw)

    coord.check_and_trigger_next_wave = check  # type: ignore[method-assign]
    coord._dispatch = dispatch  # type: ignore[method-assign]
    coord.on_dispatched = dispatched

    def uninstall() -> None:
        del coord.check_and_trigger_next_wave
        del coord._dispatch
        coord.on_dispatched = orig_dispatched

    return uninstall
