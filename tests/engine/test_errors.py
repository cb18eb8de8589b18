"""A stored error comes back as its class, so the API answers a failed job's error
with the status of its class (404 for an unknown key, 409 for a wrong state)."""

from __future__ import annotations

from engine.errors import (
    BackendUnavailable,
    Conflict,
    DewError,
    InvalidInput,
    NotFound,
    PermanentError,
    TransientError,
)


class _OwnNotFound(NotFound):
    code = "widget_not_found"


def test_from_dict_restores_the_class_of_the_code() -> None:
    for error in (_OwnNotFound("no widget"), NotFound("no task"), Conflict("busy"),
                  BackendUnavailable("redis down")):
        back = DewError.from_dict(error.to_dict())
        assert type(back) is type(error)
        assert back.to_dict() == error.to_dict()


def test_from_dict_falls_back_on_the_category_then_on_retryable() -> None:
    state = DewError.from_dict({"code": "key_state_x", "category": "state", "message": "m"})
    assert isinstance(state, Conflict) and state.code == "key_state_x"
    gone = DewError.from_dict({"code": "gizmo_not_found", "category": "parameters"})
    assert isinstance(gone, NotFound)
    bad = DewError.from_dict({"code": "odd", "category": "parameters", "message": "m"})
    assert isinstance(bad, InvalidInput)
    assert type(DewError.from_dict({"message": "m"})) is PermanentError
    assert type(DewError.from_dict({"message": "m", "retryable": True})) is TransientError
