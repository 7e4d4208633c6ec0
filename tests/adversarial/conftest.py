"""Adversarial cases: a hostile or broken tenant must not hurt another, leak a secret, or make
the engine record what did not happen. Integration-level cases use the session's PostgreSQL;
the ones that need the API server share the e2e tier's cluster, kubelet and operator fixtures
(imported here; tests/e2e/conftest.py keeps one cluster per session)."""

from __future__ import annotations

from e2e.conftest import (  # noqa: F401 - fixtures and the report hook, for this directory
    crds,
    harness,
    k8s_cluster,
    local_kubelet,
    namespace,
    operator,
    pytest_runtest_makereport,
    tenant_db,
)
