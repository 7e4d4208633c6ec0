"""CPU seconds by process role during a benchmark run (issue 12, row 8 broken down).

`CpuSampler` reads utime + stime of every process (/proc/<pid>/stat) at its start, every
`every` s and at its stop, and sums each process's CPU over the interval by the role a
`classify` function gives it (None: not part of the run, e.g. another developer's processes).
A process that existed at the start counts from its value then; one started later counts from
0; one that ended between two samples loses at most `every` s of its CPU (the reaped
children's totals of the roots, cutime + cstime, are reported beside as a check). The whole
machine's busy / idle / iowait seconds (/proc/stat) over the same interval show what the run
competed with: `machine_busy_s - sum(roles)` is everybody else (and this sampler's misses).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TICK = os.sysconf("SC_CLK_TCK")


@dataclass
class ProcStat:
    pid: int
    ppid: int
    start: int  # starttime (ticks since boot): a pid reused later is another process
    cpu: float  # utime + stime, seconds
    children: float  # cutime + cstime (reaped children), seconds


def read_stat(pid: int) -> ProcStat | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    rest = raw.rpartition(")")[2].split()
    # rest[0] is field 3 (state): utime 14, stime 15, cutime 16, cstime 17, starttime 22
    return ProcStat(
        pid,
        int(rest[1]),
        int(rest[19]),
        (int(rest[11]) + int(rest[12])) / TICK,
        (int(rest[13]) + int(rest[14])) / TICK,
    )


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        return ""


def machine_times() -> dict[str, float]:
    """The `cpu` line of /proc/stat in seconds: busy (user nice system irq softirq steal),
    iowait, idle."""
    f = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    user, nice, system, idle, iowait, irq, softirq, steal = (f + [0] * 8)[:8]
    return {
        "busy": (user + nice + system + irq + softirq + steal) / TICK,
        "iowait": iowait / TICK,
        "idle": idle / TICK,
    }


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def descends(pid: int, root: int, parents: dict[int, int]) -> bool:
    seen = 0
    while pid > 1 and seen < 64:
        if pid == root:
            return True
        pid = parents.get(pid, 0)
        seen += 1
    return pid == root


#: classify(pid, ppid map, command line) -> role, or None for a process that is not the run's
Classify = Callable[[int, dict[int, int], str], str | None]


@dataclass
class _Seen:
    role: str | None
    base: float  # CPU seconds when first seen at the start (0 for a process started later)
    last: float
    base_children: float
    last_children: float


@dataclass
class CpuSampler:
    classify: Classify
    every: float = 0.25
    #: roles whose reaped children's CPU (cutime + cstime delta) is reported too
    roots: dict[str, int] = field(default_factory=dict)
    _seen: dict[tuple[int, int], _Seen] = field(default_factory=dict)
    _m0: dict[str, float] = field(default_factory=dict)
    _m1: dict[str, float] = field(default_factory=dict)
    _t0: float = 0.0
    _t1: float = 0.0
    _load: list[str] = field(default_factory=list)
    #: at each sample: (monotonic s, CPU s so far by role, machine busy s so far)
    _series: list[tuple[float, dict[str, float], float]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    samples: int = 0

    def start(self) -> CpuSampler:
        self._t0 = time.monotonic()
        self._m0 = machine_times()
        self._load.append(load_average())
        self._sample(first=True)
        self._thread = threading.Thread(target=self._run, name="cpu-sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> dict[str, Any]:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        self._sample(first=False)
        self._t1 = time.monotonic()
        self._m1 = machine_times()
        self._load.append(load_average())
        return self.summary()

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self._sample(first=False)

    def _sample(self, first: bool) -> None:
        stats: list[ProcStat] = []
        for entry in os.scandir("/proc"):
            if entry.name.isdigit():
                st = read_stat(int(entry.name))
                if st is not None:
                    stats.append(st)
        parents = {s.pid: s.ppid for s in stats}
        for s in stats:
            key = (s.pid, s.start)
            seen = self._seen.get(key)
            if seen is None:
                role = self.classify(s.pid, parents, cmdline(s.pid))
                base = s.cpu if first else 0.0
                base_c = s.children if first else 0.0
                seen = self._seen[key] = _Seen(role, base, s.cpu, base_c, s.children)
            seen.last = s.cpu
            seen.last_children = s.children
        self.samples += 1
        self._series.append((time.monotonic(), self._by_role(), machine_times()["busy"]))

    def _by_role(self) -> dict[str, float]:
        roles: dict[str, float] = {}
        for s in self._seen.values():
            if s.role is not None:
                roles[s.role] = roles.get(s.role, 0.0) + (s.last - s.base)
        return roles

    def per_second(self) -> list[dict[str, float]]:
        """CPU seconds by role in each whole second of the run (and `machine` busy), from the
        samples nearest each second's end: where in the run each role's CPU went."""
        if not self._series:
            return []
        t0, out, prev = self._series[0][0], [], self._series[0]
        k = 1
        for sample in self._series[1:]:
            if sample[0] - t0 < k:
                continue
            row = {
                r: round(v - prev[1].get(r, 0.0), 2)
                for r, v in sample[1].items()
                if v - prev[1].get(r, 0.0) >= 0.005
            }
            row["machine"] = round(sample[2] - prev[2], 2)
            out.append(row)
            prev, k = sample, k + 1
        return out

    def summary(self) -> dict[str, Any]:
        roles = self._by_role()
        procs: dict[str, int] = {}
        for s in self._seen.values():
            if s.role is not None:
                procs[s.role] = procs.get(s.role, 0) + 1
        reaped = {}
        for role, pid in self.roots.items():
            for (p, _), s in self._seen.items():
                if p == pid and s.role is not None:
                    reaped[role] = round(s.last_children - s.base_children, 2)
        wall = self._t1 - self._t0
        busy = self._m1["busy"] - self._m0["busy"]
        ours = sum(roles.values())
        return {
            "interval_s": round(wall, 2),
            "cpu_s_by_role": {
                k: round(v, 2) for k, v in sorted(roles.items(), key=lambda x: -x[1])
            },
            "processes_by_role": dict(sorted(procs.items())),
            "run_total_cpu_s": round(ours, 2),
            "reaped_children_cpu_s": reaped,
            "machine_busy_s": round(busy, 2),
            "machine_iowait_s": round(self._m1["iowait"] - self._m0["iowait"], 2),
            "machine_idle_s": round(self._m1["idle"] - self._m0["idle"], 2),
            "machine_capacity_s": round(wall * (os.cpu_count() or 1), 2),
            "not_the_run_cpu_s": round(busy - ours, 2),
            "load_average_start_end": self._load,
            "samples": self.samples,
            "sample_every_s": self.every,
            "per_second": self.per_second(),
        }


def postmaster_of(dsn: str) -> int | None:
    """The PostgreSQL server's postmaster pid (the parent of a backend of ours)."""
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute("SELECT pg_backend_pid()").fetchone()
        st = read_stat(int(row[0])) if row else None  # while the backend lives
    return st.ppid if st else None


def classify_local(postmaster: int | None, bench: int, runner: int) -> Classify:
    """Row 6: the runner (`importwaves run-local`), its worker processes, PostgreSQL (the
    postmaster and every backend), the bench process, anything else the bench started."""

    def classify(pid: int, parents: dict[int, int], cmd: str) -> str | None:
        if postmaster is not None and (pid == postmaster or parents.get(pid) == postmaster):
            return "postgres"
        if pid == runner:
            return "runner"
        if descends(pid, runner, parents):
            return "workers" if "worker" in cmd else "runner-children-other"
        if pid == bench:
            return "bench"
        if descends(pid, bench, parents):
            return _bench_child(cmd)
        return None

    return classify


def _bench_child(cmd: str) -> str:
    if "redis" in cmd:
        return "redis"
    if cmd.startswith("postgres") or "/postgres " in cmd:
        return "postgres"  # (the postmaster not found: its processes by name)
    return "bench-children-other"


CLUSTER_PARTS = (
    "kube-apiserver",
    "etcd",
    "kube-controller-manager",
    "kube-scheduler",
    "kwok-controller",
)


def classify_cluster(
    postmaster: int | None, bench: int, operator: int, cluster_dir: str
) -> Classify:
    """Row 8: the operator, the test cluster's components (by the cluster's own directory in
    their command line), the worker pods (the local kubelet runs them as the bench's child
    processes; the kubelet itself is threads of the bench process: `bench+kubelet`),
    PostgreSQL, the bench."""

    def classify(pid: int, parents: dict[int, int], cmd: str) -> str | None:
        if postmaster is not None and (pid == postmaster or parents.get(pid) == postmaster):
            return "postgres"
        if pid == operator or descends(pid, operator, parents):
            return "operator"
        if cluster_dir and cluster_dir in cmd:
            exe = os.path.basename(cmd.split(" ", 1)[0])
            return exe if exe in CLUSTER_PARTS else "cluster-other"
        if pid == bench:
            return "bench+kubelet"
        if descends(pid, bench, parents):
            if "worker" in cmd:
                return "worker-pods"
            return _bench_child(cmd)
        return None

    return classify


def lines(cpu: dict[str, Any]) -> str:
    """One printable line: role cpu seconds, then the machine."""
    roles = ", ".join(f"{k} {v:.1f}" for k, v in cpu["cpu_s_by_role"].items())
    return (
        f"CPU s over {cpu['interval_s']:.1f} s: {roles}; run total {cpu['run_total_cpu_s']:.1f}, "
        f"machine busy {cpu['machine_busy_s']:.1f} of {cpu['machine_capacity_s']:.1f} "
        f"(not the run {cpu['not_the_run_cpu_s']:.1f}, iowait {cpu['machine_iowait_s']:.1f}); "
        f"load {' -> '.join(cpu['load_average_start_end'])}"
    )
