from __future__ import annotations

from pathlib import Path

from orchestrator.contract import render

SCHEMAS = Path(__file__).resolve().parents[2] / "docs" / "schemas"


def test_checked_in_json_schemas_match_the_code() -> None:
    """If this fails, the wire contract changed: run `python -m orchestrator.contract docs/schemas`,
    review the diff, and tell the producers (docs/jobs.md)."""
    rendered = render()
    on_disk = {p.name: p.read_text() for p in SCHEMAS.glob("*.json")}
    assert sorted(on_disk) == sorted(rendered), "schema files added or removed"
    for name, text in rendered.items():
        assert on_disk[name] == text, f"docs/schemas/{name} is out of date"
