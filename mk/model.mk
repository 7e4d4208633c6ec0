# Model check of the coordination protocol (issue 15): model/README.md.
#   make model    SPIN on model/*.pml: the seed's original design's two counterexamples found,
#                 this protocol's safety and liveness properties verified, three known-bad mutants
#                 caught; prints states stored, depth, memory and time per run (< 2 min on 2 cores)
# SPIN is Debian's `spin` (6.5.2), installed here when missing (as root, like CI on a fresh clone).

test: model

.PHONY: model spin

spin:
	@command -v spin >/dev/null 2>&1 || { \
		echo "installing spin (Debian package)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq spin gcc >/dev/null; }
	@command -v gcc >/dev/null 2>&1 || { \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq gcc >/dev/null; }

model: spin venv
	$(BIN)/python model/check.py $(MODEL_ARGS)

# The larger instance (2 faults of any kind; about 3 min): part of `make soak`.
.PHONY: model-large
model-large: spin venv
	$(BIN)/python model/check.py --large

soak: model-large
