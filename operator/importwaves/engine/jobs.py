"""Rules for changing a job's spec after it was submitted (pure)."""

from __future__ import annotations

from importwaves.spec import ImportSpec

#: Fields that may change while an import runs; everything else shapes the plan.
MUTABLE_FIELDS = frozenset(
    {
        "parallelism",
        "retries",
        "retryBackoff",
        "staleAfterSeconds",
        "claimTimeoutSeconds",
        "suspend",
        "worker",
        "completionThreshold",
    }
)


class SpecChangeRefused(ValueError):
    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("spec change refused: " + "; ".join(problems))


def spec_change_problems(old: ImportSpec, new: ImportSpec, *, planned: bool) -> list[str]:
    """Why `new` cannot replace `old` for a running import (empty when it can)."""
    if not planned:
        return (
            []
            if old.tenant == new.tenant
            else [f"tenant cannot change (was {old.tenant!r}, now {new.tenant!r})"]
        )
    problems = []
    for name in ImportSpec.model_fields:
        if name in MUTABLE_FIELDS:
            continue
        if getattr(old, name) != getattr(new, name):
            problems.append(
                f"{name} cannot change once the import is planned (waves and batches exist); "
                "create a new ImportJob instead"
            )
    return problems
