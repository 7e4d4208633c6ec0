"""Launchers hand dispatched batches to workers: local processes or Kubernetes Jobs."""
