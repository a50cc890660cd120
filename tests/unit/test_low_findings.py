"""The security review's low findings, each pinned: image references (L1), what errors tell
whom (L4) and what the CLI lets reach a terminal (L7)."""

from __future__ import annotations

import io
from pathlib import Path

import msgspec
import pytest
import yaml  # type: ignore[import-untyped]
from rich.console import Console

from orchestrator import cli
from orchestrator.auth import hash_token, parse_tokens
from orchestrator.schemas import ImageRef, SessionCreate
from tests.fakes import open_stack
from workers.runtime.errors import DesktopError
from workers.runtime.inner import image_in_path

GOOD_IMAGES = [
    "alpine",
    "alpine:3.20",
    "library/alpine:latest",
    "registry:5000/team/app:v1_2",
    "my-registry.example.com/a__b/c-d.e:1.0-rc",
    "localhost/x@sha256:" + "a" * 64,
]
BAD_IMAGES = [
    "a/../../containers/desktop-s-victim",
    "a/./b",
    "a//b",
    "..",
    ".hidden",
    "a/",
    "-flag",
    "a..b",
    "Alpine",
    "alpine\n",
    "a:",
    "a?x=1",
    "a#b",
    "a%2e%2e/b",
]


@pytest.mark.parametrize("image", GOOD_IMAGES)
def test_docker_references_are_accepted(image: str) -> None:
    assert msgspec.convert(image, ImageRef) == image


@pytest.mark.parametrize("image", BAD_IMAGES)
def test_what_is_not_a_docker_reference_is_refused(image: str) -> None:
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert(image, ImageRef)


@pytest.mark.parametrize(
    "body",
    [
        {"id": "abc\n"},
        {"labels": {"team\n": "x"}},
        {"env": {"API_KEY\n": "x"}},
        {"sandbox": "sb-1\n"},
    ],
)
def test_a_trailing_newline_is_refused_where_a_pattern_ends_in_dollar(body: dict[str, object]) -> None:
    # Python's '$' also matches before a final newline: "abc\n" would become a Docker name.
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert(body, SessionCreate)
    clean = msgspec.json.decode(msgspec.json.encode(body).replace(b"\\n", b""))
    msgspec.convert(clean, SessionCreate)  # the same body without it is fine


def test_image_names_in_docker_api_paths_are_quoted_and_cannot_climb() -> None:
    assert image_in_path("registry:5000/team/app:v1") == "registry:5000/team/app:v1"
    assert image_in_path("a?b#c%d") == "a%3Fb%23c%25d"
    for bad in ("a/../../containers/x", "./a", "a//b", ".."):
        with pytest.raises(DesktopError):
            image_in_path(bad)


def test_a_malformed_token_entry_is_never_echoed() -> None:
    raw = "orch_Xq3v9sEcRetTokenValue"
    for spec in (raw, f"ops:{hash_token('a')}:admin; {raw}", f"{raw}:{raw}"):
        with pytest.raises(ValueError) as refused:
            parse_tokens(spec)
        assert raw not in str(refused.value)
        assert "entry" in str(refused.value)


def test_the_cli_drops_control_characters_and_escapes_markup(monkeypatch: pytest.MonkeyPatch) -> None:
    out = io.StringIO()
    monkeypatch.setattr(cli, "console", Console(file=out, force_terminal=True, color_system=None, width=200))
    evil = "\x1b]8;;http://evil/\x07x\x1b[2J[link=http://evil]click[/link][bold]b"
    cli._table(["ID", "LABELS"], [["s-1", f"team={evil}"]])
    printed = out.getvalue()
    assert "\x1b" not in printed and "\x07" not in printed
    assert "[link=http://evil]click[/link][bold]b" in printed  # shown as text, not applied
    assert cli._plain("a\x00b\x1bc\x7fd\x9be\tf\ng") == "abcdefg"
    assert cli._markup("[red]x\x1b") == "\\[red]x"


async def test_an_unexpected_bring_up_error_puts_nothing_internal_on_the_session(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """L4: every events:read token sees the session's error; the exception goes to the log."""
    async with open_stack(redis_url) as stack:

        async def broken(session_id: str) -> bool:
            raise RuntimeError("dial unix /var/run/inner-secret.sock: permission denied")

        monkeypatch.setattr(stack.runtime, "ensure_volume", broken)
        await stack.create("s-internal")
        assert await stack.run_queued() == ["failed: internal_error"]
        record = await stack.store.get("s-internal")
        assert record is not None and record.error is not None
        assert record.error.code == "internal_error"
        failed = (await stack.events("s-internal"))[-1]
        for text in (record.error.message, str(failed.data)):
            assert "inner-secret" not in text and "RuntimeError" not in text


def test_every_redis_the_project_starts_fsyncs_each_write() -> None:
    """L8: with ``everysec`` a crash can lose the last second, an acknowledged create with it."""
    root = Path(__file__).resolve().parents[2]
    compose = yaml.safe_load((root / "docker-compose.yml").read_text())
    command = compose["services"]["redis"]["command"]
    assert command[command.index("--appendfsync") + 1] == "always"
    env_sh = (root / "scripts" / "env.sh").read_text()
    assert "--appendfsync always" in env_sh and "everysec" not in env_sh
