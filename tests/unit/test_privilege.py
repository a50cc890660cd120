from __future__ import annotations

import pytest

from workers.privilege import choose_profile, missing_capabilities

FULL = "000001ffffffffff"
NO_SYS_RESOURCE = "000001fffeffffff"  # what our CI machines report


def test_missing_capabilities_are_named() -> None:
    assert missing_capabilities(NO_SYS_RESOURCE, 40) == ("SYS_RESOURCE",)
    assert missing_capabilities(FULL, 40) == ()


def test_auto_picks_privileged_only_with_a_complete_bounding_set() -> None:
    assert choose_profile("auto", FULL, 40).host_config() == {"Privileged": True}
    caps = choose_profile("auto", NO_SYS_RESOURCE, 40)
    assert caps.kind == "caps"
    config = caps.host_config()
    assert config["CapAdd"] == ["ALL"]
    assert config["CapDrop"] == ["SYS_RESOURCE"]
    assert "seccomp=unconfined" in config["SecurityOpt"]
    assert config["MaskedPaths"] == [] and config["ReadonlyPaths"] == []
    assert "SYS_RESOURCE" in caps.describe()


def test_explicit_settings_win() -> None:
    assert choose_profile("privileged", NO_SYS_RESOURCE, 40).kind == "privileged"
    assert choose_profile("caps", FULL, 40).host_config()["CapDrop"] == []
    assert choose_profile("runtime:sysbox-runc", FULL, 40).host_config() == {"Runtime": "sysbox-runc"}


@pytest.mark.parametrize("bad", ["root", "runtime:", "Privileged"])
def test_unknown_settings_are_refused(bad: str) -> None:
    with pytest.raises(ValueError, match=r"privilege|runtime"):
        choose_profile(bad, FULL, 40)


def test_auto_candidates_go_from_most_to_least_capable() -> None:
    from workers.privilege import candidates

    kinds = [(p.kind, p.missing_caps) for p in candidates("auto", NO_SYS_RESOURCE, 40)]
    assert kinds == [("privileged", ()), ("caps", ()), ("caps", ("SYS_RESOURCE",))]
    # A worker inside a default container sees a small bounding set: that guess comes last.
    small = candidates("auto", "00000000a80425fb", 40)
    assert small[-1].kind == "caps" and "SYS_ADMIN" in small[-1].missing_caps
    assert [p.kind for p in candidates("caps", FULL, 40)] == ["caps"]
