# Kubernetes test binaries (etcd, kube-apiserver, kube-controller-manager, kube-scheduler,
# kubectl, helm, kwok, kwokctl) built from Go modules into a cache dir outside the repo.
# Pinned versions: hack/testbin/versions.env. A warm `make testbin` is a no-op.
#   make testbin          build what is missing (cold: ~7 min on 2 cores, warm: ~10 ms)
#   make testbin-dir      print the bin dir
#   make testbin-clean    drop the built binaries (Go's module and build caches stay)
TESTBIN_DIR := $(shell bash hack/testbin/bindir.sh)
export IMPORTWAVES_TESTBIN := $(TESTBIN_DIR)

TEST_PREREQS += testbin

.PHONY: testbin testbin-dir testbin-clean

testbin:
	@bash hack/testbin/build.sh >/dev/null

testbin-dir:
	@echo $(TESTBIN_DIR)

TESTBIN_BINARIES := etcd kube-apiserver kube-controller-manager kube-scheduler kubectl helm kwok kwokctl
testbin-clean:
	cd "$(TESTBIN_DIR)" && rm -f $(TESTBIN_BINARIES)
