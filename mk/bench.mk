# Benchmarks (issue 7): measured side by side on real servers, printed as a table and written to
# bench/results.json. Not part of `make test`; nothing here asserts a timing.
#   make bench                    the full suite (~20 min on 2 cores; rows 5 and 8 start a Kubernetes test cluster)
#   make bench BENCH_ARGS=--quick a short smoke run (~7 min)
# Row 5 needs the Kubernetes test binaries (`make testbin`, a no-op when built).
# Celery (the row 1 peer) lives in its own virtualenv, bench/.venv-celery, created on first use.

.PHONY: bench

bench: venv testbin
	$(BIN)/python -m bench.run $(BENCH_ARGS)
