#!/usr/bin/env bash
# Regenerates the image's lock files from pyproject.toml with uv (from the dev venv):
#   requirements/image.txt  the runtime dependencies ([project].dependencies), every package
#                           pinned with the hashes of all its files on PyPI
#   requirements/build.txt  what builds the project's wheel ([build-system].requires)
# The Dockerfile installs both with `pip install --require-hashes`; tests/unit/test_lock.py
# checks that they still match pyproject.toml. Run it (`make lock`) after changing either list.
set -euo pipefail
cd "$(dirname "$0")/../.."
UV=${UV:-.venv/bin/uv}
PY=${PYTHON:-.venv/bin/python}

compile() {  # $1: out file, stdin: requirement lines
  "$UV" pip compile - --quiet --universal --python-version 3.11 --generate-hashes \
    --no-strip-markers --custom-compile-command "make lock" --output-file "$1"
}
"$PY" -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml","rb"))["project"]["dependencies"]))' \
  | compile requirements/image.txt
"$PY" -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml","rb"))["build-system"]["requires"]))' \
  | compile requirements/build.txt
echo "wrote requirements/image.txt ($(grep -c '^[a-z]' requirements/image.txt) packages)," \
     "requirements/build.txt ($(grep -c '^[a-z]' requirements/build.txt))"
