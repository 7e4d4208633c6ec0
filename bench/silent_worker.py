"""The reference worker without its completion NOTIFY: a worker that commits its batch exactly
as `importwaves worker` does but, like a worker written in another language, does not tell the
operator (its NOTIFY carries an empty payload, which the operator's listener ignores).
Row 5 uses it to measure the operator's other paths (the worker Job's completion event, the
timer) on their own. Run in a worker pod as `python -m bench.silent_worker` (PYTHONPATH = repo).
"""

from __future__ import annotations

import sys

from importwaves import worker


def main() -> int:
    # An empty payload: the operator's listener cannot parse it and ignores it.
    worker.completion_payload = lambda item: "{}"  # type: ignore[assignment]
    return worker.main()


if __name__ == "__main__":
    sys.exit(main())
