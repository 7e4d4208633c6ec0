"""The e2e test harness: the cluster, the local kubelet (and its podman mode), the operator kit
and bounded waits; and the self-tests of that harness (test_*.py here), not of the product."""
