# The kubectl transcript of an import (issue 13): tests/e2e/test_kubectl_transcript.py drives an
# import with the real kubectl (apply -f, a refused patch, delete mid-run, apply again; one batch
# fails once with a stderr line, then succeeds on its retry) against the test cluster, records
# `kubectl get importjobs -o wide` over time and `kubectl describe` at each change, asserts over
# the recording, and writes it to TRANSCRIPT_OUT, printed at the end.
#   make transcript    ~45 s with warm test binaries (`make testbin`)

TRANSCRIPT_OUT ?= /tmp/importwaves-transcript.txt

.PHONY: transcript

transcript: venv testbin
	@rm -f $(TRANSCRIPT_OUT)
	IMPORTWAVES_TRANSCRIPT_OUT=$(TRANSCRIPT_OUT) $(BIN)/pytest \
		tests/e2e/test_kubectl_transcript.py -q -p no:cacheprovider; rc=$$?; \
		if [ -s $(TRANSCRIPT_OUT) ]; then echo; cat $(TRANSCRIPT_OUT); fi; exit $$rc
