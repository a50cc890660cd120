"""The state machine, by property: no sequence of requests and crashes escapes it."""

from __future__ import annotations

import itertools

from hypothesis import given
from hypothesis import strategies as st

from orchestrator import states
from orchestrator.states import IN_PROGRESS, SessionState, TransitionError

S = SessionState
ALL = list(SessionState)


def test_the_documented_paths_are_allowed() -> None:
    for path in (
        [S.PENDING, S.CREATING, S.STARTING, S.READY, S.STOPPING, S.STOPPED, S.STARTING, S.READY],
        [S.READY, S.DELETING, S.DELETED],
        [S.CREATING, S.FAILED, S.STOPPING, S.STOPPED],
        [S.STARTING, S.FAILED, S.DELETING, S.DELETED],
    ):
        for a, b in itertools.pairwise(path):
            assert states.allowed(a, b), (a, b)


def test_refused_transitions_raise_and_name_both_states() -> None:
    for a, b in [(S.PENDING, S.READY), (S.READY, S.STARTING), (S.STOPPED, S.FAILED), (S.DELETED, S.DELETING)]:
        assert not states.allowed(a, b)
        try:
            states.check(a, b)
        except TransitionError as e:
            assert a.value in str(e) and b.value in str(e)
        else:
            raise AssertionError(f"{a} -> {b} was not refused")


@given(st.sampled_from(ALL))
def test_deleted_is_final(target: SessionState) -> None:
    assert not states.allowed(S.DELETED, target)


@given(st.sampled_from(ALL))
def test_only_in_progress_and_ready_states_can_fail(current: SessionState) -> None:
    # ...but never a delete: once asked for, it is carried out (the model test found why).
    expected = (current in IN_PROGRESS and current is not S.DELETING) or current is S.READY
    assert states.allowed(current, S.FAILED) == expected


@given(st.lists(st.sampled_from(ALL), max_size=60))
def test_any_sequence_of_requests_stays_in_known_states(requests: list[SessionState]) -> None:
    """Apply only what check() allows, as the store does: every reached state is a defined one,
    from every non-final state `deleting` is reachable, and nothing leaves `deleted`."""
    state = S.PENDING
    for target in requests:
        if states.allowed(state, target):
            state = target
        assert state in ALL
        if state is not S.DELETED:
            assert states.allowed(state, S.DELETING) or state is S.DELETING
    if S.DELETED in requests and state is S.DELETED:
        assert all(not states.allowed(state, t) for t in ALL)
