"""What a user sees with kubectl, recorded over time: `kubectl get importjobs -o wide` polled
(every row with the seconds since the recording started), a `kubectl get importjobs -o wide -w`
stream next to it, and `kubectl describe importjob` each time the polled row changed.

Real kubectl against the test cluster, nothing parsed from the API directly: the assertions of
tests/e2e/test_kubectl_transcript.py are about the text a person reads.
"""

from __future__ import annotations

import contextlib
import re
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from .cluster import Cluster

#: A line of describe's Events table: TYPE REASON AGE FROM MESSAGE (AGE may hold single
#: spaces, "5s (x2 over 10s)"; tabwriter puts at least two between columns).
_EVENT_LINE = re.compile(r"^\s*(Normal|Warning)\s+(\S+)\s+(.+?)\s{2,}(\S+)\s{2,}(.*)$")

#: Columns whose text changes with the clock alone (ages): left out when rows are compared.
CLOCK_COLUMNS = ("AGE", "STARTED")


def parse_table(text: str) -> list[dict[str, str]]:
    """The rows of a `kubectl get` table (tabwriter output: every cell of a column starts where
    its header starts), as {HEADER: cell}; an empty cell is ''."""
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        return []
    header = lines[0]
    starts = [i for i, ch in enumerate(header) if ch != " " and (i == 0 or header[i - 1] == " ")]
    names = header.split()
    assert len(starts) == len(names), header
    rows = []
    for line in lines[1:]:
        cells = {}
        for k, name in enumerate(names):
            end = starts[k + 1] if k + 1 < len(starts) else None
            cells[name] = line[starts[k] : end].strip()
        rows.append(cells)
    return rows


@dataclass(frozen=True)
class Row:
    """One polled `kubectl get -o wide` row of the ImportJob (None cells: it did not exist)."""

    at: float  # seconds since the recording started, when the poll began
    until: float  # ... and when it returned
    cells: dict[str, str] | None
    line: str = ""  # the row as kubectl printed it

    @property
    def key(self) -> tuple[tuple[str, str], ...] | None:
        if self.cells is None:
            return None
        return tuple((k, v) for k, v in self.cells.items() if k not in CLOCK_COLUMNS)

    def __getitem__(self, column: str) -> str:
        assert self.cells is not None, f"no row at {self.at:.1f}s"
        return self.cells[column]


@dataclass
class Transcript:
    """Records ImportJob `name` in `namespace` until stop(); `mark(text)` notes what the test
    did (kubectl apply, patch, delete) at that moment."""

    cluster: Cluster
    namespace: str
    name: str
    interval: float = 0.4
    header: str = ""
    rows: list[Row] = field(default_factory=list)
    describes: list[tuple[float, str]] = field(default_factory=list)
    watch_lines: list[tuple[float, str]] = field(default_factory=list)
    marks: list[tuple[float, str]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._t0 = time.monotonic()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._poller = threading.Thread(target=self._poll, name="kubectl-get", daemon=True)
        self._watch: subprocess.Popen[str] | None = None
        self._reader: threading.Thread | None = None

    def now(self) -> float:
        return time.monotonic() - self._t0

    def kubectl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run kubectl in the namespace, noting the command (and how it ended) in the marks."""
        started = self.now()
        r = self.cluster.kubectl("-n", self.namespace, *args, check=check)
        out = (r.stdout.strip() or r.stderr.strip()).splitlines()
        shown = " ".join(Path(a).name if a.startswith("/") else a for a in args)
        self.mark(f"$ kubectl {shown}  (exit {r.returncode})", started)
        for line in out[:3]:
            self.mark(f"  {line}", started)
        return r

    def mark(self, text: str, at: float | None = None) -> None:
        with self._lock:
            self.marks.append((self.now() if at is None else at, text))

    # -- recording -----------------------------------------------------------------------------
    def start(self) -> Transcript:
        self._poller.start()
        cmd = [
            str(self.cluster.bin_dir / "kubectl"),
            f"--kubeconfig={self.cluster.kubeconfig}",
            "-n",
            self.namespace,
            "get",
            "importjobs",
            "-o",
            "wide",
            "-w",
        ]
        self._watch = subprocess.Popen(
            cmd,
            env=self.cluster.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
        )
        self._reader = threading.Thread(target=self._read_watch, name="kubectl-w", daemon=True)
        self._reader.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._poller.join(30)
        if self._watch is not None:
            self._watch.terminate()
            try:
                self._watch.wait(10)
            except subprocess.TimeoutExpired:
                self._watch.kill()
                self._watch.wait(10)
        if self._reader is not None:
            self._reader.join(10)

    def _read_watch(self) -> None:
        assert self._watch is not None and self._watch.stdout is not None
        for line in self._watch.stdout:
            with self._lock:
                self.watch_lines.append((self.now(), line.rstrip("\n")))

    def _poll(self) -> None:
        last: tuple[tuple[str, str], ...] | str | None = "start"
        while not self._stop.is_set():
            began = self.now()
            try:
                r = self.cluster.kubectl(
                    "-n", self.namespace, "get", "importjobs", "-o", "wide", check=False, timeout=30
                )
            except subprocess.TimeoutExpired:
                self.errors.append(f"{began:.1f}s: kubectl get timed out")
                continue
            if r.returncode != 0:
                self.errors.append(f"{began:.1f}s: kubectl get exited {r.returncode}: {r.stderr}")
            else:
                row = self._row_of(r.stdout, began)
                with self._lock:
                    self.rows.append(row)
                if row.key != last:
                    last = row.key
                    if row.cells is not None:
                        self._describe(began)
            with contextlib.suppress(ValueError):
                time.sleep(max(0.0, self.interval - (self.now() - began)))

    def _row_of(self, stdout: str, began: float) -> Row:
        lines = [line for line in stdout.splitlines() if line.strip()]
        if lines:
            self.header = self.header or lines[0].rstrip()
        for cells, line in zip(parse_table(stdout), lines[1:], strict=True):
            if cells.get("NAME") == self.name:
                return Row(began, self.now(), cells, line.rstrip())
        return Row(began, self.now(), None)

    def _describe(self, at: float) -> str:
        r = self.cluster.kubectl(
            "-n", self.namespace, "describe", "importjob", self.name, check=False, timeout=30
        )
        if r.returncode == 0:
            with self._lock:
                self.describes.append((at, r.stdout))
        return r.stdout if r.returncode == 0 else ""

    def describe_now(self) -> str:
        """`kubectl describe importjob` now, kept with the others ('' if it failed)."""
        at = self.now()
        self.mark(f"$ kubectl describe importjob {self.name}", at)
        return self._describe(at)

    # -- reading -------------------------------------------------------------------------------
    def present(self) -> list[Row]:
        with self._lock:
            return [r for r in self.rows if r.cells is not None]

    def changes(self) -> list[Row]:
        """The polled rows that differ from the row polled before (clock columns aside): what
        a person watching would have seen change, including the ImportJob's absence."""
        out: list[Row] = []
        with self._lock:
            rows = list(self.rows)
        for r in rows:
            if not out or out[-1].key != r.key:
                out.append(r)
        return out

    def described_events(self) -> list[tuple[float, str]]:
        """Each distinct line of the Events section of the recorded `kubectl describe`s (its
        AGE column aside), with when it was first seen."""
        seen: dict[str, tuple[float, str]] = {}
        with self._lock:
            describes = list(self.describes)
        for at, text in describes:
            _, _, events = text.partition("\nEvents:\n")
            for line in events.splitlines()[2:]:
                m = _EVENT_LINE.match(line)
                if m is not None:
                    kind, reason, _age, source, message = m.groups()
                    key = f"{kind:7}  {reason}  {source}  {message}"
                    seen.setdefault(key, (at, key))
        return sorted(seen.values())

    def watched_statuses(self, words: set[str]) -> list[tuple[float, str]]:
        """The STATUS word of each `kubectl get -w` line of the ImportJob (READY is one word
        or empty, so STATUS is the first known word after NAME)."""
        out = []
        with self._lock:
            lines = list(self.watch_lines)
        for at, line in lines:
            tokens = line.split()
            if not tokens or tokens[0] != self.name:
                continue
            word = next((t for t in tokens[1:3] if t in words), "")
            out.append((at, word))
        return out

    def render(self) -> str:
        """The distinct rows with elapsed seconds (and the test's kubectl commands between
        them), then the last `kubectl describe`."""
        changes = self.changes()
        names = list(next((r.cells for r in changes if r.cells is not None), {}) or {})
        # one alignment for all rows (each kubectl call aligned only its own output)
        width = {
            n: max([len(n)] + [len(r.cells[n]) for r in changes if r.cells is not None])
            for n in names
        }

        def line(cells: dict[str, str]) -> str:
            return "   ".join(cells[n].ljust(width[n]) for n in names).rstrip()

        events: list[tuple[float, int, str]] = []
        for r in changes:
            text = (
                line(r.cells)
                if r.cells is not None
                else "(no ImportJob: kubectl get finds nothing)"
            )
            events.append((r.at, 1, f"{r.at:6.1f}s  {text}"))
        with self._lock:
            marks = list(self.marks)
            describes = list(self.describes)
        for at, text in marks:
            events.append((at, 0, f"{at:6.1f}s  {text}"))
        events.sort(key=lambda e: (e[0], e[1]))
        out = [
            f"# kubectl -n {self.namespace} get importjobs -o wide, polled every "
            f"{self.interval:g}s: the rows as they changed (AGE and STARTED aside), with the "
            "seconds since the recording started; realigned into one table",
            f"{'':8}{line({n: n for n in names})}",
            *(e[2] for e in events),
        ]
        described = self.described_events()
        if described:
            out += ["", "# Events as `kubectl describe importjob` showed them (first seen at)"]
            out += [f"{at:6.1f}s  {line}" for at, line in described]
        with self._lock:
            watched = list(self.watch_lines)
        if watched:
            out += ["", f"# kubectl -n {self.namespace} get importjobs -o wide -w  (as received)"]
            out += [f"{at:6.1f}s  {line}" for at, line in watched]
        if describes:
            at, text = describes[-1]
            out += ["", f"# kubectl describe importjob {self.name}  (at {at:.1f}s)", text.rstrip()]
        return "\n".join(out) + "\n"
