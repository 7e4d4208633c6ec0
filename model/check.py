"""Run the SPIN checks of model/*.pml, print what each found and write readable trails.

    python model/check.py               every run of the small instance (`make model`)
    python model/check.py --large       the larger instance (`make soak`)
    python model/check.py NAME...       the named runs
    python model/check.py --list        the runs, with what each must find

Each run: `spin -a` with the run's switches, gcc, `./pan`, in model/.build/NAME/. A run either
must pass (no error) or must find a counterexample of a given kind; a counterexample's trail is
replayed (`spin -t`) and written, one numbered line per transition (which process did what), to
model/trails/NAME.txt. Exit status 1 when any run did not find what it must.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
BUILD = HERE / ".build"
TRAILS = HERE / "trails"

NO_ERROR = "no error"
ASSERTION = "assertion violated"
ACCEPTANCE = "acceptance cycle"
NON_PROGRESS = "non-progress cycle"
INVALID_END = "invalid end state"


@dataclass(frozen=True)
class Run:
    name: str
    model: str
    what: str
    expect: str
    defines: tuple[str, ...] = ()
    cflags: tuple[str, ...] = ()
    pan: tuple[str, ...] = ()
    optimize: str = "-O0"
    large: bool = False  #: a larger instance, for `make soak` (`--large`)


# fmt: off
RUNS: tuple[Run, ...] = (
    # -- the seed's original design: both counterexamples must be found ---------------------
    Run("original_completed_early", "original.pml",
        "original design: job marked completed while derived batches are pending",
        ASSERTION, (), ("-DNOCLAIM", "-DSAFETY", "-DREACH"), ("-i",)),
    Run("original_derived_stuck", "original.pml",
        "original design: derived batches never dispatched (weak fairness)",
        ACCEPTANCE, ("-DNO_COMPLETION_ASSERT",), ("-DNFAIR=6",),
        ("-a", "-f", "-N", "derived_done")),
    # -- this project's protocol: every property must hold ------------------------------------
    Run("protocol_safety", "protocol.pml",
        "safety, 1 fault of any kind, 1 attempt, 1 retry-failed, thresholds 100 and 50",
        NO_ERROR, ("-DFAULTS=1", "-DMAX_ATTEMPTS=1", "-DRETRIES=1"), ("-DNOCLAIM", "-DSAFETY"),
        ("-m200000",), "-O1"),
    Run("protocol_safety_crashes", "protocol.pml",
        "safety, 2 coordinator deaths, thresholds 100 and 50",
        NO_ERROR, ("-DFAULTS=0", "-DCRASHES=2"), ("-DNOCLAIM", "-DSAFETY"), ("-m200000",), "-O1"),
    Run("protocol_completes", "protocol.pml",
        "liveness <>completed under weak fairness, 1 fault, 2 attempts, threshold 100",
        NO_ERROR, ("-DFAULTS=1", "-DMAX_ATTEMPTS=2", "-DTHR=100"), ("-DNFAIR=8",),
        ("-a", "-f", "-N", "completes", "-m200000"), "-O1"),
    Run("protocol_no_progress_cycles", "protocol.pml",
        "no non-progress cycle under weak fairness, 1 fault, threshold 100",
        NO_ERROR, ("-DFAULTS=1", "-DTHR=100"), ("-DNP", "-DNFAIR=8", "-DNOCLAIM"),
        ("-l", "-f", "-m200000"), "-O1"),
    Run("protocol_done_or_failed", "protocol.pml",
        "liveness <>(completed or failed) under weak fairness, 1 fault, 1 attempt, threshold 50",
        NO_ERROR, ("-DFAULTS=1", "-DMAX_ATTEMPTS=1", "-DTHR=50"), ("-DNFAIR=8",),
        ("-a", "-f", "-N", "done", "-m200000"), "-O1"),
    # -- a larger instance (`make soak`) -------------------------------------------------------
    Run("large_safety_thr100", "protocol.pml",
        "safety, 2 faults of any kind, threshold 100",
        NO_ERROR, ("-DFAULTS=2", "-DTHR=100"), ("-DNOCLAIM", "-DSAFETY", "-DCOLLAPSE"),
        ("-m200000", "-w26"), "-O1", large=True),
    Run("large_safety_thr50", "protocol.pml",
        "safety, 2 faults of any kind, threshold 50",
        NO_ERROR, ("-DFAULTS=2", "-DTHR=50"), ("-DNOCLAIM", "-DSAFETY", "-DCOLLAPSE"),
        ("-m200000", "-w26"), "-O1", large=True),
    Run("large_completes_thr50", "protocol.pml",
        "liveness <>completed under weak fairness, 1 fault and 1 crash, 3 attempts, threshold 50",
        NO_ERROR, ("-DFAULTS=1", "-DCRASHES=1", "-DMAX_ATTEMPTS=3", "-DTHR=50"),
        ("-DNFAIR=8", "-DCOLLAPSE"), ("-a", "-f", "-N", "completes", "-m200000", "-w26"), "-O1",
        large=True),
    # -- the three known-bad mutants: each must be caught --------------------------------------
    Run("mutant_no_guard", "protocol.pml",
        "mutant: the completion guard dropped (main waves done = job done)",
        ASSERTION, ("-DMUTANT_NO_GUARD", "-DFAULTS=0"), ("-DNOCLAIM", "-DSAFETY", "-DREACH"),
        ("-i", "-m200000")),
    Run("mutant_precommit", "protocol.pml",
        "mutant: derived creation gated on parent completion read before the commit",
        ACCEPTANCE, ("-DMUTANT_PRECOMMIT", "-DFAULTS=0", "-DTHR=100"), ("-DNFAIR=8",),
        ("-a", "-f", "-N", "completes", "-m200000")),
    Run("mutant_precommit_no_progress", "protocol.pml",
        "mutant: the same, as a non-progress cycle (the progress check can fail)",
        NON_PROGRESS, ("-DMUTANT_PRECOMMIT", "-DFAULTS=0", "-DTHR=100"),
        ("-DNP", "-DNFAIR=8", "-DNOCLAIM"), ("-l", "-f", "-m200000")),
    Run("mutant_stale_token", "protocol.pml",
        "mutant: a stale fencing token may complete a batch",
        ASSERTION, ("-DMUTANT_STALE_TOKEN", "-DFAULTS=1", "-DTHR=100"),
        ("-DNOCLAIM", "-DSAFETY", "-DREACH"), ("-i", "-m200000")),
)
# fmt: on


@dataclass
class Result:
    run: Run
    found: str = NO_ERROR
    states: int = 0
    depth: int = 0
    memory_mb: float = 0.0
    seconds: float = 0.0  #: spin -a, gcc and pan
    pan_seconds: float = 0.0  #: pan's own search time
    trail: list[str] = field(default_factory=list)
    output: str = ""

    @property
    def ok(self) -> bool:
        return self.found == self.run.expect


def _sh(cmd: list[str], cwd: Path) -> str:
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
    out = done.stdout + done.stderr
    if done.returncode != 0 and cmd[0] != "./pan":
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}):\n{out}")
    return out


def parse_pan(out: str) -> tuple[str, int, int, float]:
    """(what it found, states stored, depth reached, memory in MB) from pan's report."""
    found = NO_ERROR
    if re.search(r"pan:\d+: assertion violated", out):
        found = ASSERTION
    elif re.search(r"pan:\d+: acceptance cycle", out):
        found = ACCEPTANCE
    elif re.search(r"pan:\d+: non-progress cycle", out):
        found = NON_PROGRESS
    elif re.search(r"pan:\d+: invalid end state", out):
        found = INVALID_END
    elif not re.search(r"errors: 0\b", out):
        found = "error: " + (out.strip().splitlines() or ["no output"])[-1]
    states = re.search(r"(\d+) states, stored", out)
    depth = re.search(r"depth reached (\d+)", out)
    memory = re.search(r"([\d.]+)\s+total actual memory usage", out)
    return (
        found,
        int(states.group(1)) if states else 0,
        int(depth.group(1)) if depth else 0,
        float(memory.group(1)) if memory else 0.0,
    )


def readable_trail(replay: str) -> list[str]:
    """`spin -t` output -> numbered lines "N. Process: transition ...", repeats folded."""
    names: dict[str, str] = {}
    for proc in re.finditer(r"proc\s+(\d+) \((\w+):\d+\)", replay):
        names[proc.group(1)] = proc.group(2)
    events: list[str] = []
    for line in replay.splitlines():
        text = line.strip()
        if "START OF CYCLE" in text:
            events.append("--- the cycle starts here (it repeats forever) ---")
            continue
        said = re.match(r"@(\d+) (.*)", text)
        if said:
            who = names.get(said.group(1), f"proc {said.group(1)}")
            events.append(f"{who}[{said.group(1)}]: {said.group(2)}")
    out: list[str] = []
    n = 0
    i = 0
    while i < len(events):
        if events[i].startswith("---"):
            out.append(events[i])
            i += 1
            continue
        # fold a transition, or a pair of them (an idle tick: tick + nothing), repeated in a row
        width, times = 1, 1
        for w in (1, 2):
            k = 1
            while events[i + k * w : i + (k + 1) * w] == events[i : i + w]:
                k += 1
            if k > 1 and not any(e.startswith("---") for e in events[i : i + w]):
                width, times = w, k
                break
        for j, e in enumerate(events[i : i + width]):
            n += 1
            last = j == width - 1 and times > 1
            again = f"  (x{times})" if width == 1 else f"  (lines {n - 1}-{n}, x{times})"
            out.append(f"{n:3d}. {e}" + (again if last else ""))
        i += width * times
    final = re.findall(r"^\s+(\w+(?:\[\d\])?) = (\d+)$", replay, re.M)
    if final:
        out.append("final state: " + ", ".join(f"{k}={v}" for k, v in final))
    return out


def check(run: Run) -> Result:
    work = BUILD / run.name
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    shutil.copy(HERE / run.model, work / run.model)
    result = Result(run)
    t0 = time.monotonic()
    _sh(["spin", "-a", *run.defines, run.model], work)
    _sh(["gcc", run.optimize, "-w", *run.cflags, "-o", "pan", "pan.c"], work)
    out = _sh(["./pan", *run.pan], work)
    result.seconds = time.monotonic() - t0
    result.output = out
    result.found, result.states, result.depth, result.memory_mb = parse_pan(out)
    elapsed = re.search(r"pan: elapsed time ([\d.e+]+) seconds", out)
    result.pan_seconds = float(elapsed.group(1)) if elapsed else 0.0
    (TRAILS / f"{run.name}.txt").unlink(missing_ok=True)
    if result.found != NO_ERROR and (work / f"{run.model}.trail").exists():
        replay = _sh(["spin", "-t", "-T", *run.defines, run.model], work)
        result.trail = readable_trail(replay)
        TRAILS.mkdir(exist_ok=True)
        header = [
            f"# {run.name}: {run.what}",
            f"# SPIN found: {result.found} (model/{run.model}, {' '.join(run.defines) or '-'})",
            "",
        ]
        (TRAILS / f"{run.name}.txt").write_text("\n".join(header + result.trail) + "\n")
    return result


def table(results: list[Result]) -> str:
    rows = [("run", "must find", "found", "states", "depth", "MB", "search s", "total s", "")]
    for r in results:
        rows.append(
            (
                r.run.name,
                r.run.expect,
                r.found,
                f"{r.states:,}",
                str(r.depth),
                f"{r.memory_mb:.0f}",
                f"{r.pan_seconds:.1f}",
                f"{r.seconds:.1f}",
                "ok" if r.ok else "FAIL",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(
            c.ljust(w) if i < 3 else c.rjust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in rows
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="runs to check (default: all)")
    parser.add_argument("--list", action="store_true", help="list the runs")
    parser.add_argument("--large", action="store_true", help="the larger instance (make soak)")
    parser.add_argument("-j", "--jobs", type=int, default=2, help="runs at once (default 2)")
    args = parser.parse_args(argv)
    if args.list:
        for run in RUNS:
            large = " (--large)" if run.large else ""
            print(f"{run.name:28} must find: {run.expect:20} {run.what}{large}")
        return 0
    by_name = {r.name: r for r in RUNS}
    unknown = [n for n in args.names if n not in by_name]
    if unknown:
        parser.error(f"no such run: {', '.join(unknown)} (see --list)")
    if args.names:
        runs = [by_name[n] for n in args.names]
    else:
        runs = [r for r in RUNS if r.large == args.large]
    t0 = time.monotonic()
    results = []
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        for r in pool.map(check, runs):
            results.append(r)
            verdict = "as it must" if r.ok else "MUST FIND " + r.run.expect
            print(f"{r.run.name}: {r.found} ({verdict})", flush=True)
            if r.trail:
                print(f"  trail: model/trails/{r.run.name}.txt ({len(r.trail)} lines)")
    print()
    print(table(results))
    print(f"\n{len(results)} runs in {time.monotonic() - t0:.0f}s")
    failed = [r for r in results if not r.ok]
    for r in failed:
        print(f"\n{r.run.name}: found {r.found}, must find {r.run.expect}\n{r.output[-3000:]}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
