"""The CLI's one-line summaries of events (``sessions wait``/``events`` print them)."""

from __future__ import annotations

from orchestrator.cli import _describe


def test_display_ready_says_the_screen_and_when() -> None:
    data = {"width": 1024, "height": 768, "depth": 24, "display": ":0", "duration_ms": 611}
    assert _describe("display.ready", data) == "1024x768x24 on :0, 611 ms after start"


def test_other_events_say_nothing_extra() -> None:
    assert _describe("desktop.started", {"container": "d"}) == ""
