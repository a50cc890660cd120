"""Hostile input: schemathesis generates requests from the API's own OpenAPI document (its
coverage phase: boundary and invalid values; then random fuzzing) and sends them in-process
(ASGI) to the real app with its Redis: schemathesis' engine, the one `st run` drives, without
the subprocess, uvicorn or a port. No request may get a 5xx, no response may carry a stack
trace, and every refusal (4xx) says why in the API's error shape {code, message, field}.

The two event-stream endpoints are left out (and the port proxy's `{path}` forms, below): with
``follow`` (their default) they never end, so every generated request would just wait for its
timeout; their inputs (``after``,
``Last-Event-ID``, filters) have their own tests."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator

import pytest
import schemathesis
from schemathesis import engine
from schemathesis.engine import Status, events
from schemathesis.python.asgi import shutdown_lifespans
from schemathesis.schemas import BaseSchema

from orchestrator.api import create_app
from orchestrator.config import Settings

from .conftest import TOKENS

AUTH = {"Authorization": f"Bearer {TOKENS['admin']}"}
CONFIG = schemathesis.Config.from_dict(
    {
        "seed": 20261128,
        "headers": AUTH,
        "request-timeout": 10,
        "phases": {
            "examples": {"enabled": False},
            "coverage": {"enabled": True},
            "fuzzing": {"enabled": True},
            "stateful": {"enabled": False},
        },
        # No example database: with one, hypothesis keeps a Pareto front of schemathesis' targets
        # and spends a third of the run optimising it. The seed keeps the run repeatable anyway.
        "generation": {"max-examples": 150, "database": "none"},
        "checks": {"enabled": False, "not_a_server_error": {"enabled": True}},
    }
)


@pytest.fixture
def app_schema(settings: Settings) -> Iterator[BaseSchema]:
    """The document, read through the app itself; the app's lifespan (Redis, arq) ends with the test."""
    try:
        schema = schemathesis.openapi.from_asgi("/openapi.json", create_app(settings), config=CONFIG, headers=AUTH)
        # And the port proxy's `{path}` forms: schemathesis cannot generate a `path`-typed
        # parameter (it filters every example out); the bare `/ports/{port}` form is the same
        # handler, and is fuzzed.
        yield schema.exclude(path_regex="/events").exclude(path_regex=r"/ports/\{port\}/\{path\}")
    finally:
        shutdown_lifespans()


@pytest.mark.slow  # about 90 s: `make test` runs it, `make test-fast` leaves it out
@pytest.mark.timeout(600)
def test_a_thousand_generated_requests_get_no_5xx_and_no_stack_traces(app_schema: BaseSchema) -> None:
    responses: list[tuple[str, int, bytes]] = []  # (operation, status, body)
    problems: list[str] = []
    for event in engine.from_schema(app_schema).execute():
        if isinstance(event, events.ScenarioFinished):
            if event.status in (Status.FAILURE, Status.ERROR):
                problems.append(f"{event.label}: {event.status}")
            for interaction in event.recorder.interactions.values():
                if interaction.response is not None:
                    response = interaction.response
                    responses.append((event.label or "", response.status_code, response.content or b""))
        elif isinstance(event, events.NonFatalError | events.FatalError):
            problems.append(f"engine error: {event!r}")
    assert not problems, problems

    per_operation = Counter(operation for operation, _, _ in responses)
    assert len(responses) >= 1000, per_operation
    assert len(per_operation) >= 10, per_operation  # the API's operations all had their turn
    for operation, status, body in responses:
        where = f"{operation} -> {status}: {body[:500]!r}"
        assert status < 500, where
        assert b"Traceback" not in body and b'File "' not in body, where
        # Litestar's own /docs router renders HTML pages, its 404 among them: the shape is the API's.
        # A HEAD answer has no body by definition (the port proxy takes HEAD).
        if 400 <= status < 500 and " /docs" not in operation and not operation.startswith("HEAD "):
            try:
                error = json.loads(body)
            except ValueError:
                raise AssertionError(f"a refusal that is not JSON: {where}") from None
            assert isinstance(error, dict) and set(error) == {"code", "message", "field"}, where
            assert isinstance(error["code"], str) and error["code"], where
            assert isinstance(error["message"], str) and error["message"], where
            assert error["field"] is None or isinstance(error["field"], str), where
    assert any(400 <= status < 500 for _, status, _ in responses), "no request was refused: no invalid input"
