# syntax=docker/dockerfile:1
# The importwaves image: the operator (`importwaves run`, the default command) and the worker
# its Jobs run (`importwaves worker`), one image for both.
#
#   docker build -t importwaves:0.1.0 .
#
# Stage 1 builds the wheel from pyproject.toml and installs it, with its runtime dependencies
# only (no dev or local extras), into a virtualenv. Stage 2 copies that virtualenv onto a clean
# slim base: no compiler, no pip cache, no sources. tests/unit/test_dockerfile.py runs these same
# RUN steps outside Docker and lints this file with hadolint.

FROM python:3.11.12-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY operator/ operator/
# The runtime virtualenv gets no pip and no setuptools: the build stage's pip installs into it.
RUN python -m pip wheel --no-deps --wheel-dir /dist . \
 && python -m venv --without-pip /opt/importwaves \
 && python -m pip --python /opt/importwaves/bin/python install /dist/importwaves-*.whl

FROM python:3.11.12-slim-bookworm
LABEL org.opencontainers.image.title="importwaves" \
      org.opencontainers.image.description="Kubernetes operator for multi-wave, parent-first imports into multi-tenant PostgreSQL" \
      org.opencontainers.image.licenses="Apache-2.0"
# A numeric non-root user: the operator's and the worker Jobs' pods set runAsNonRoot, which the
# kubelet can only verify for a numeric USER.
RUN groupadd --system --gid 10001 importwaves \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin importwaves
COPY --from=build /opt/importwaves /opt/importwaves
ENV PATH=/opt/importwaves/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
USER 10001:10001
# No HEALTHCHECK: Kubernetes ignores it; the chart's probes use kopf's /healthz instead.
ENTRYPOINT ["importwaves"]
CMD ["run"]
