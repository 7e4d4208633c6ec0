# Benchmarks (issue 7): measured side by side on real servers, printed as a table and written to
# bench/results.json. Not part of `make test`; nothing here asserts a timing.
#   make bench                    the full suite (~6-7 min on 2 cores)
#   make bench BENCH_ARGS=--quick a short smoke run (~1.5 min)
# Celery (the row 1 peer) lives in its own virtualenv, bench/.venv-celery, created on first use.

.PHONY: bench

bench: venv
	$(BIN)/python -m bench.run $(BENCH_ARGS)
