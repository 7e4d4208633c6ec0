# Proof of the guard rules under faults (issue 6).
#   make soak    the guard-rule state machine, long profile: SOAK_EXAMPLES sequences (default
#                5000, ~35 min on 2 cores) of random stimuli and faults on the real PostgreSQL and
#                Redis; prints how many sequences, steps, checks and faults it ran
#   make chaos   a demo-size import (CHAOS_ARGS, default --orders 20000) whose runner process is
#                SIGKILLed at random moments (>= 20 times) and restarted, with Redis flushed and
#                restarted and workers killed mid-batch; verifies the data and prints a table
# `make test` runs both in short form (tests/property: 200 sequences; tests/chaos: 5 kills).

SOAK_EXAMPLES ?= 5000
SOAK_STEPS ?= 30
# pytest-timeout's project default (600 s, pyproject.toml) would cut the long profile short
# (it did: 1,232 sequences, then a timeout misreported by hypothesis as a flaky strategy);
# a hang still ends it.
SOAK_TIMEOUT ?= 10800
CHAOS_ARGS ?=

.PHONY: soak chaos

soak: venv
	IW_PROPERTY_EXAMPLES=$(SOAK_EXAMPLES) IW_PROPERTY_STEPS=$(SOAK_STEPS) \
		$(BIN)/pytest tests/property/test_guard_rules.py -q -p no:cacheprovider -p no:logging \
		--timeout=$(SOAK_TIMEOUT)

chaos: venv
	$(BIN)/python tests/chaos/chaos.py $(CHAOS_ARGS)
