"""The rotation state machine, as a pure function: state + step outcome -> next state.

A rotation is four steps (AWS Secrets Manager's, which CSMS users know):

1. ``create``: a new random value as a pending version (stage SYSPENDING);
2. ``set``: apply it to the target (the database user's password);
3. ``test``: log in with it;
4. ``finish``: move SYSCURRENT to it; the old current becomes SYSPREVIOUS.

The state is stored with the secret after every step, so a re-run (a retry, a
worker killed with SIGKILL, the next scheduled rotation) resumes at the step
after the last one recorded, reusing the pending version. A failure keeps the
state where it was, except a failure *after* ``set`` that was rolled back
(the database got its old password again): the rotation then goes back to
``created``, so SYSCURRENT is valid whatever happens.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Step(StrEnum):
    CREATE = "create"
    SET = "set"
    TEST = "test"
    FINISH = "finish"


# The last step done -> the step to run next.
_NEXT: dict[Step | None, Step | None] = {
    None: Step.CREATE,
    Step.CREATE: Step.SET,
    Step.SET: Step.TEST,
    Step.TEST: Step.FINISH,
    Step.FINISH: None,
}


@dataclass(frozen=True)
class RotationState:
    done: Step | None = None  # the last step recorded
    pending_version: str | None = None

    @property
    def next_step(self) -> Step | None:
        return _NEXT[self.done]

    @property
    def finished(self) -> bool:
        return self.done is Step.FINISH

    @property
    def target_changed(self) -> bool:
        """Whether the target may hold the pending value (set ran, finish did not)."""
        return self.done in (Step.SET, Step.TEST)


@dataclass(frozen=True)
class StepOutcome:
    step: Step
    ok: bool
    pending_version: str | None = None  # what create made or found
    rolled_back: bool = False  # after a failure: the target has the current value again


def advance(state: RotationState, outcome: StepOutcome) -> RotationState:
    """The state after ``outcome``. Raises ValueError for a step run out of turn."""
    if outcome.step is not state.next_step:
        raise ValueError(f"step {outcome.step} cannot follow {state.done or 'nothing'}")
    if outcome.ok:
        if outcome.step is Step.CREATE:
            if not outcome.pending_version:
                raise ValueError("create must name the pending version")
            return RotationState(Step.CREATE, outcome.pending_version)
        if outcome.step is Step.FINISH:
            return RotationState(Step.FINISH, None)
        return RotationState(outcome.step, state.pending_version)
    if outcome.rolled_back and state.target_changed:
        return RotationState(Step.CREATE, state.pending_version)
    return state


def plan(state: RotationState) -> list[Step]:
    """The steps left to run from ``state``."""
    steps: list[Step] = []
    step = state.next_step
    while step is not None:
        steps.append(step)
        step = _NEXT[step]
    return steps
