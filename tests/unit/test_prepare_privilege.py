"""The worker's privilege decision (workers/prepare.py) over a probe that answers as told: under
``auto`` an unsafe profile is never chosen on the machine's user namespace; the worker refuses
instead, at error, saying what to set. Nested in a user namespace, caps is chosen, confined."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import pytest

from orchestrator.config import Settings
from tests.fakes import offline_runtime
from workers.prepare import DesktopPreparation, PrivilegeRefused
from workers.privilege import CONFINED, PrivilegeKind, PrivilegeProfile
from workers.runtime import DesktopRuntime

MACHINE = "         0          0 4294967295\n"
IN_USERNS_DESKTOP = "         0     100000      65536\n"


class Probe:
    """Answers the probe: userns fails (as where the kernel refuses it), the others run."""

    def __init__(self) -> None:
        self.tried: list[PrivilegeKind] = []

    async def try_profile(self, profile: PrivilegeProfile) -> str | None:
        self.tried.append(profile.kind)
        return "the probe exited with status 1: unshare: write failed" if profile.kind is PrivilegeKind.USERNS else None


@pytest.fixture
async def runtime() -> AsyncIterator[DesktopRuntime]:
    # A real runtime that never reaches a daemon here: only its probe is asked, and answered above.
    async with offline_runtime(PrivilegeProfile(PrivilegeKind.USERNS, "auto")) as made:
        yield made


def prepared(
    runtime: DesktopRuntime, monkeypatch: pytest.MonkeyPatch, *, privilege: str, uid_map: str
) -> tuple[DesktopPreparation, Probe]:
    probe = Probe()
    monkeypatch.setattr(runtime, "probe", probe)
    monkeypatch.setattr("workers.prepare.read_uid_map", lambda: uid_map)
    monkeypatch.setattr("workers.prepare.read_bounding_set", lambda: ("000001fffeffffff", 40))
    return DesktopPreparation(runtime, Settings(privilege=privilege)), probe


async def test_auto_refuses_to_serve_where_userns_fails(
    runtime: DesktopRuntime, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    preparation, probe = prepared(runtime, monkeypatch, privilege="auto", uid_map=MACHINE)
    with caplog.at_level(logging.INFO, "workers.prepare"), pytest.raises(PrivilegeRefused) as refused:
        await preparation.choose_privilege()
    assert refused.value.code == "privilege_refused"
    assert probe.tried == [PrivilegeKind.USERNS]  # nothing unsafe was even tried
    (error,) = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert "userns: the probe exited with status 1: unshare" in error.getMessage()
    assert "ORCH_PRIVILEGE=caps|privileged|runtime:<name>" in error.getMessage()
    assert preparation.refused_event.is_set()
    assert not runtime.profile.unsafe
    # Before each desktop (lifecycle, pool): refused again, not probed again.
    with pytest.raises(PrivilegeRefused):
        await preparation.before_desktop()
    assert probe.tried == [PrivilegeKind.USERNS]


async def test_auto_nested_in_a_user_namespace_falls_back_to_confined_caps(
    runtime: DesktopRuntime, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    preparation, probe = prepared(runtime, monkeypatch, privilege="auto", uid_map=IN_USERNS_DESKTOP)
    with caplog.at_level(logging.INFO, "workers.prepare"):
        profile = await preparation.choose_privilege()
    assert probe.tried == [PrivilegeKind.USERNS, PrivilegeKind.CAPS]
    assert profile.kind is PrivilegeKind.CAPS and profile.unsafe and profile.confined
    assert runtime.profile is profile
    assert any(CONFINED in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
    assert not any("UNSAFE" in r.getMessage() for r in caplog.records)


async def test_named_caps_runs_as_named_and_is_logged_unsafe(
    runtime: DesktopRuntime, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    preparation, probe = prepared(runtime, monkeypatch, privilege="caps", uid_map=MACHINE)
    with caplog.at_level(logging.INFO, "workers.prepare"):
        profile = await preparation.choose_privilege()
    assert profile.kind is PrivilegeKind.CAPS and profile.unsafe and not profile.confined
    assert probe.tried == []  # named: used as named
    (warning,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert warning.getMessage().startswith("UNSAFE privilege profile: caps")
