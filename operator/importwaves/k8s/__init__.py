"""Kubernetes side: the ImportJob CRD, the kopf operator and its pure helpers."""
