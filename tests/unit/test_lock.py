"""The image's lock files (requirements/*.txt, written by `make lock` with uv) match
pyproject.toml: every dependency pinned (==) at a version its specifier allows, every pin
hashed (the Dockerfile installs with --require-hashes), nothing pinned that no dependency
needs, and nothing of the extras (rich, the test tools) in the image's lock."""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


@dataclass
class Pin:
    name: str
    version: str
    marker: Marker | None
    hashes: list[str] = field(default_factory=list)
    via: list[str] = field(default_factory=list)


def parse_lock(path: Path) -> dict[str, Pin]:
    """uv's `pip compile --generate-hashes` output: `name==version [; marker] \\`, hash lines,
    then `# via x` or `# via` followed by `#   x` lines."""
    pins: dict[str, Pin] = {}
    current: Pin | None = None
    in_via = False
    for raw in path.read_text().splitlines():
        line = raw.strip()
        m = re.fullmatch(r"([A-Za-z0-9._-]+)==([^\s;\\]+)\s*(?:;\s*(.+?))?\s*\\?", line)
        if m and not raw.startswith(" "):
            name = canonicalize_name(m.group(1))
            current = Pin(name, m.group(2), Marker(m.group(3)) if m.group(3) else None)
            assert name not in pins, f"{path.name}: {name} pinned twice"
            pins[name] = current
            in_via = False
        elif line.startswith("--hash=sha256:"):
            assert current is not None
            current.hashes.append(line.split(":", 1)[1].rstrip(" \\"))
        elif line.startswith("# via"):
            assert current is not None
            rest = line[len("# via") :].strip()
            in_via = not rest
            if rest:
                current.via.append(rest)
        elif in_via and line.startswith("#   "):
            assert current is not None
            current.via.append(line[4:].strip())
        elif line and not line.startswith("#"):
            pytest.fail(f"{path.name}: unexpected line {raw!r}")
    return pins


IMAGE_LOCK = parse_lock(ROOT / "requirements" / "image.txt")
BUILD_LOCK = parse_lock(ROOT / "requirements" / "build.txt")


def _check_covers(pins: dict[str, Pin], requirements: list[str], where: str) -> None:
    for text in requirements:
        req = Requirement(text)
        pin = pins.get(canonicalize_name(req.name))
        assert pin is not None, f"{where}: {req.name} is not in the lock file; run `make lock`"
        assert req.specifier.contains(pin.version, prereleases=True), (
            f"{where}: {req.name}{req.specifier} but the lock pins {pin.version}; run `make lock`"
        )


def test_every_pin_is_exact_and_hashed() -> None:
    for lock in (IMAGE_LOCK, BUILD_LOCK):
        assert lock
        for pin in lock.values():
            assert pin.hashes, f"{pin.name} has no hash"
            assert all(re.fullmatch(r"[0-9a-f]{64}", h) for h in pin.hashes), pin.name


def test_image_lock_covers_the_runtime_dependencies() -> None:
    deps = PYPROJECT["project"]["dependencies"]
    _check_covers(IMAGE_LOCK, deps, "requirements/image.txt")
    # ... the extras they ask for too (psycopg[binary,pool] -> psycopg-binary, psycopg-pool).
    for text in deps:
        req = Requirement(text)
        for extra in req.extras:
            assert canonicalize_name(f"{req.name}-{extra}") in IMAGE_LOCK, text


def test_image_lock_pins_nothing_no_dependency_needs() -> None:
    """A pin with no `# via` is one of pyproject's dependencies, and every other pin is needed
    by a pinned package: a dependency dropped from pyproject.toml must go."""
    direct = {canonicalize_name(Requirement(d).name) for d in PYPROJECT["project"]["dependencies"]}
    top = {p.name for p in IMAGE_LOCK.values() if not p.via}
    assert top <= direct, f"pinned but not a dependency: {sorted(top - direct)}; run `make lock`"
    for pin in IMAGE_LOCK.values():
        for parent in pin.via:
            assert canonicalize_name(parent) in IMAGE_LOCK, f"{pin.name} via unknown {parent}"


def test_image_lock_has_no_extras_or_tools() -> None:
    extras = {
        canonicalize_name(Requirement(r).name)
        for group in PYPROJECT["project"]["optional-dependencies"].values()
        for r in group
        if not r.startswith("importwaves")
    }
    runtime = {canonicalize_name(Requirement(d).name) for d in PYPROJECT["project"]["dependencies"]}
    assert "rich" in extras and "rich" not in runtime  # the demo's terminal view is an extra
    leaked = (extras - runtime) & set(IMAGE_LOCK)
    assert not leaked, f"extras in the image's lock: {sorted(leaked)}"
    assert not {"pip", "setuptools", "wheel", "uv"} & set(IMAGE_LOCK)


def test_build_lock_covers_the_build_system() -> None:
    _check_covers(BUILD_LOCK, PYPROJECT["build-system"]["requires"], "requirements/build.txt")


def test_parse_lock_catches_a_stale_pin(tmp_path: Path) -> None:
    """The check can fail: a lock pinning a version outside the specifier is reported."""
    lock = tmp_path / "l.txt"
    lock.write_text("click==7.0 \\\n    --hash=sha256:" + "a" * 64 + "\n")
    with pytest.raises(AssertionError, match=r"click>=8.1 but the lock pins 7.0"):
        _check_covers(parse_lock(lock), ["click>=8.1"], "l.txt")
    with pytest.raises(AssertionError, match="redis is not in the lock"):
        _check_covers(parse_lock(lock), ["redis>=5"], "l.txt")
