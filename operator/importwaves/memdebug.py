"""Opt-in memory diagnostics of the operator process (a debugging aid, off by default).

`IMPORTWAVES_TRACEMALLOC=<directory>` makes `importwaves run` start `tracemalloc` at the
operator's startup, after its imports (`IMPORTWAVES_TRACEMALLOC_FRAMES` frames per allocation,
default 6; 0 traces nothing), and every `IMPORTWAVES_TRACEMALLOC_INTERVAL` seconds (default 30)
append one line to `status.txt` (VmRSS/VmHWM, threads by name, the traced Python memory, glibc's
`mallinfo2`: bytes in use versus free bytes the allocator keeps) and dump the snapshot
(`snapshot-NNN.tracemalloc`). The analysis runs offline, not in the operator:
`python -m importwaves.memdebug DIR [A B]` prints the largest allocation sites of snapshot B
and its growth since A and since the snapshot before B, by line and by traceback. Tracing costs
CPU and memory (~60 bytes per live block, slower allocations): never on in production; with
FRAMES=0 only the status lines are written, at no cost to speak of.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import linecache
import os
import sys
import threading
import time
import tracemalloc
from collections import Counter
from pathlib import Path

ENV_DIR = "IMPORTWAVES_TRACEMALLOC"
ENV_INTERVAL = "IMPORTWAVES_TRACEMALLOC_INTERVAL"
ENV_FRAMES = "IMPORTWAVES_TRACEMALLOC_FRAMES"
TOP = 25


_MALLINFO2_FIELDS = (
    "arena",
    "ordblks",
    "smblks",
    "hblks",
    "hblkhd",
    "usmblks",
    "fsmblks",
    "uordblks",
    "fordblks",
    "keepcost",
)


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in _MALLINFO2_FIELDS]


def mallinfo() -> dict[str, int] | None:
    """glibc's heap figures (main arena plus the others): `arena` bytes from sbrk/arenas,
    `hblkhd` in mmapped chunks, `uordblks` in use, `fordblks` free but kept; None off glibc."""
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        fn = ctypes.CDLL(name).mallinfo2
    except (OSError, AttributeError):
        return None
    fn.restype = _Mallinfo2
    m = fn()
    return {f: int(getattr(m, f)) for f in _MALLINFO2_FIELDS}


def proc_status() -> dict[str, str]:
    out = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            k, _, v = line.partition(":")
            if k in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "Threads"):
                out[k] = v.strip()
    except OSError:
        pass
    return out


def _mb(n: float) -> str:
    return f"{n / 1048576:.1f} MB"


def _trace_lines(tb: tracemalloc.Traceback) -> list[str]:
    out = []
    for frame in tb:
        src = linecache.getline(frame.filename, frame.lineno).strip()
        out.append(f"    {frame.filename}:{frame.lineno}  {src[:100]}")
    return out


def report(
    snap: tracemalloc.Snapshot,
    first: tracemalloc.Snapshot | None,
    prev: tracemalloc.Snapshot | None,
) -> str:
    """The largest allocation sites of `snap` and its growth since `first` and `prev`."""
    snap = snap.filter_traces(
        (
            tracemalloc.Filter(False, tracemalloc.__file__),
            tracemalloc.Filter(False, "<frozen importlib._bootstrap>"),
        )
    )
    total = sum(st.size for st in snap.statistics("filename"))
    lines = [f"traced in this snapshot: {_mb(total)}"]
    lines.append(f"\n## top {TOP} by line")
    for st in snap.statistics("lineno")[:TOP]:
        fr = st.traceback[0]
        lines.append(f"{_mb(st.size):>10} {st.count:>8}  {fr.filename}:{fr.lineno}")
    for label, base in (("first report", first), ("previous report", prev)):
        if base is None:
            continue
        lines.append(f"\n## growth since the {label}, by line")
        for d in snap.compare_to(base, "lineno")[:TOP]:
            fr = d.traceback[0]
            lines.append(
                f"{_mb(d.size_diff):>10} {d.count_diff:>+8}  (now {_mb(d.size)})  "
                f"{fr.filename}:{fr.lineno}"
            )
    if first is not None:
        lines.append("\n## growth since the first report, by traceback (top 10)")
        for d in snap.compare_to(first, "traceback")[:10]:
            lines.append(f"{_mb(d.size_diff)} {d.count_diff:+} blocks (now {_mb(d.size)})")
            lines += _trace_lines(d.traceback)
    return "\n".join(lines) + "\n"


def status() -> str:
    """One line: VmRSS/VmHWM, threads, traced memory, glibc's heap figures."""
    cur, peak = tracemalloc.get_traced_memory()
    parts = [
        time.strftime("%Y-%m-%dT%H:%M:%S"),
        f"proc {proc_status()}",
        f"pymalloc blocks {sys.getallocatedblocks()}, gc objects {len(gc.get_objects())}",
        f"traced {_mb(cur)} (peak {_mb(peak)}, "
        f"tracemalloc's own {_mb(tracemalloc.get_tracemalloc_memory())})",
        "threads "
        + str(
            sorted(Counter(t.name.rstrip("0123456789_-") for t in threading.enumerate()).items())
        ),
    ]
    mi = mallinfo()
    if mi:
        parts.append(
            f"mallinfo2: arena {_mb(mi['arena'])}, mmapped {_mb(mi['hblkhd'])}, in use "
            f"{_mb(mi['uordblks'])}, free kept {_mb(mi['fordblks'])}"
        )
    return "; ".join(parts)


def _loop(out: Path, interval: float) -> None:
    """Only the snapshot and one status line here: the analysis (`report`) runs offline
    (`python -m importwaves.memdebug DIR`); in a busy operator a thread doing it starves for
    the GIL (a 100k-trace report took 28 s in the bench)."""
    n = 0
    while True:
        time.sleep(interval)
        try:
            line = status()
            if tracemalloc.is_tracing():  # whole files only (the process may end meanwhile)
                part = out / f"snapshot-{n:03d}.part"
                tracemalloc.take_snapshot().dump(str(part))
                part.replace(out / f"snapshot-{n:03d}.tracemalloc")
            with (out / "status.txt").open("a") as f:
                f.write(f"{n:03d} {line}\n")
        except Exception as exc:  # a debugging aid never takes the operator down
            (out / f"snapshot-{n:03d}.error").write_text(repr(exc))
        n += 1


def start_from_env() -> bool:
    """Start tracing and the report thread if IMPORTWAVES_TRACEMALLOC names a directory."""
    where = os.environ.get(ENV_DIR, "")
    if not where:
        return False
    out = Path(where)
    out.mkdir(parents=True, exist_ok=True)
    frames = int(os.environ.get(ENV_FRAMES) or 6)
    if frames > 0:  # 0: the status lines only (RSS, threads, mallinfo2), no tracing cost
        tracemalloc.start(frames)
    interval = float(os.environ.get(ENV_INTERVAL) or 30)
    threading.Thread(target=_loop, args=(out, interval), name="tracemalloc", daemon=True).start()
    return True


def main(argv: list[str] | None = None) -> None:
    """`python -m importwaves.memdebug DIR [A B]`: the report of snapshot B (default: the
    last) against A (default: the first) and the one before B."""
    import sys

    args = list(sys.argv[1:] if argv is None else argv)
    d = Path(args[0])
    snaps = sorted(d.glob("snapshot-*.tracemalloc"))
    pick = {int(a) for a in args[1:3]}
    first = snaps[min(pick)] if pick else snaps[0]
    last = snaps[max(pick)] if pick else snaps[-1]
    before = snaps[max(0, snaps.index(last) - 1)]
    load = tracemalloc.Snapshot.load
    print(f"# {last.name} against {first.name} and {before.name}")
    print(report(load(str(last)), load(str(first)), load(str(before))))


if __name__ == "__main__":
    main()
