from __future__ import annotations

import pytest

from workers.privilege import choose_profile, missing_capabilities

FULL = "000001ffffffffff"
NO_SYS_RESOURCE = "000001fffeffffff"  # what our CI machines report


def test_missing_capabilities_are_named() -> None:
    assert missing_capabilities(NO_SYS_RESOURCE, 40) == ("SYS_RESOURCE",)
    assert missing_capabilities(FULL, 40) == ()


MACHINE = "         0          0 4294967295\n"  # the kernel pads the columns
IN_USERNS_DESKTOP = "         0     100000      65536\n"
SYSBOX = "0 165536 65536\n"
TWO_RANGES = "0 0 1000\n1000 100000 65536\n"


def test_caps_is_hardened_as_far_as_docker_in_docker_allows() -> None:
    import json

    caps = choose_profile("caps", NO_SYS_RESOURCE, 40)
    assert caps.kind == "caps" and caps.unsafe
    config = caps.host_config()
    assert config["CgroupnsMode"] == "private"
    assert config["CapDrop"] == ["ALL"]
    for dangerous in ("SYS_MODULE", "SYS_TIME", "DAC_READ_SEARCH", "SYS_RAWIO", "SYS_BOOT", "SYS_RESOURCE"):
        assert dangerous not in config["CapAdd"], dangerous
    assert {"SYS_ADMIN", "NET_ADMIN", "MKNOD", "SETFCAP"} <= set(config["CapAdd"])
    # Docker's masked and read-only paths kept; ip forwarding set per container instead.
    assert "MaskedPaths" not in config and "ReadonlyPaths" not in config
    assert config["Sysctls"] == {"net.ipv4.ip_forward": "1"}
    (seccomp,) = [o.removeprefix("seccomp=") for o in config["SecurityOpt"] if o.startswith("seccomp=")]
    denied = {n for rule in json.loads(seccomp)["syscalls"] for n in rule["names"]}
    assert {"open_by_handle_at", "init_module", "finit_module", "kexec_load", "reboot", "clock_settime"} <= denied
    assert "SYS_RESOURCE" in caps.describe() and "hardened" in caps.describe()
    # A kept capability the bounding set lacks is not asked for (runc would refuse the container).
    no_mknod = f"{int('000001ffffffffff', 16) & ~(1 << 27):016x}"
    assert "MKNOD" not in choose_profile("caps", no_mknod, 40).host_config()["CapAdd"]
    assert choose_profile("privileged", FULL, 40).host_config() == {"Privileged": True}


def test_confined_caps_keeps_what_a_nested_proc_mount_needs() -> None:
    from dataclasses import replace

    config = replace(choose_profile("caps", NO_SYS_RESOURCE, 40), confined=True).host_config()
    assert config["MaskedPaths"] == [] and config["ReadonlyPaths"] == []
    assert config["CapAdd"] == ["ALL"] and config["CapDrop"] == ["SYS_RESOURCE"]


@pytest.mark.parametrize(
    ("uid_map", "nested"),
    [
        (MACHINE, False),
        ("0 0 4294967295", False),
        (IN_USERNS_DESKTOP, True),
        (SYSBOX, True),
        (TWO_RANGES, True),
        ("0 0 4294967294\n", True),  # one uid short of the machine's: a namespace of its own
        # Unreadable or malformed: counted as the machine's (no confined fallback on a guess).
        ("", False),
        ("0 0\n", False),
        ("zero 0 4294967295\n", False),
    ],
)
def test_nested_in_userns_reads_the_uid_map(uid_map: str, nested: bool) -> None:
    from workers.privilege import nested_in_userns

    assert nested_in_userns(uid_map) is nested


@pytest.mark.parametrize("bounding", [FULL, NO_SYS_RESOURCE, "00000000a80425fb"])
def test_auto_on_the_machine_is_userns_only_never_an_unsafe_fallback(bounding: str) -> None:
    from workers.privilege import candidates

    for uid_map in (MACHINE, "", "garbage"):
        found = candidates("auto", bounding, 40, uid_map=uid_map)
        assert [(p.kind, p.unsafe, p.confined) for p in found] == [("userns", False, False)], uid_map
    assert choose_profile("auto", bounding, 40).kind == "userns"


@pytest.mark.parametrize("uid_map", [IN_USERNS_DESKTOP, SYSBOX, TWO_RANGES])
def test_auto_nested_in_a_user_namespace_may_fall_back_to_confined_caps(uid_map: str) -> None:
    from workers.privilege import CONFINED, candidates

    found = candidates("auto", NO_SYS_RESOURCE, 40, uid_map=uid_map)
    assert [(p.kind, p.missing_caps) for p in found] == [("userns", ()), ("caps", ()), ("caps", ("SYS_RESOURCE",))]
    assert not found[0].unsafe
    for caps in found[1:]:
        assert caps.unsafe and caps.confined and CONFINED in caps.describe()
    # Never privileged on its own, nested or not.
    assert all(p.kind != "privileged" for p in found)
    # A worker in a default container sees a small bounding set: that guess comes last.
    small = candidates("auto", "00000000a80425fb", 40, uid_map=uid_map)
    assert small[-1].kind == "caps" and small[-1].confined and "SYS_ADMIN" in small[-1].missing_caps


def test_named_profiles_are_used_as_named_and_say_whether_confined() -> None:
    from workers.privilege import CONFINED, candidates

    (caps,) = candidates("caps", FULL, 40, uid_map=MACHINE)
    assert caps.kind == "caps" and caps.unsafe and not caps.confined and CONFINED not in caps.describe()
    (nested,) = candidates("caps", FULL, 40, uid_map=IN_USERNS_DESKTOP)
    assert nested.confined and CONFINED in nested.describe()
    (userns,) = candidates("userns", FULL, 40, uid_map=IN_USERNS_DESKTOP)
    assert not userns.unsafe and CONFINED not in userns.describe()
    assert [p.kind for p in candidates("runtime:sysbox-runc", FULL, 40, uid_map=MACHINE)] == ["runtime"]


def test_the_refusal_names_what_failed_and_the_settings_that_accept_the_risk() -> None:
    from workers.privilege import PrivilegeKind, PrivilegeProfile, refusal

    message = refusal([(PrivilegeProfile(PrivilegeKind.USERNS, "probe"), "the probe exited with status 1: boom")])
    assert "userns: the probe exited with status 1: boom" in message
    assert "ORCH_PRIVILEGE=caps|privileged|runtime:<name>" in message
    assert message.startswith("refusing to serve")


def test_explicit_settings_win() -> None:
    assert choose_profile("privileged", NO_SYS_RESOURCE, 40).kind == "privileged"
    assert choose_profile("caps", FULL, 40).missing_caps == ()
    assert choose_profile("runtime:sysbox-runc", FULL, 40).host_config() == {"Runtime": "sysbox-runc"}


@pytest.mark.parametrize("bad", ["root", "runtime:", "Privileged"])
def test_unknown_settings_are_refused(bad: str) -> None:
    with pytest.raises(ValueError, match=r"privilege|runtime"):
        choose_profile(bad, FULL, 40)


def test_userns_is_named_and_safe_and_the_others_are_unsafe() -> None:
    from workers.privilege import candidates

    userns = choose_profile("userns", NO_SYS_RESOURCE, 40)
    assert userns.kind == "userns" and not userns.unsafe
    assert candidates("userns", FULL, 40, uid_map=MACHINE) == [userns]
    assert choose_profile("caps", FULL, 40).unsafe and choose_profile("privileged", FULL, 40).unsafe
    assert not choose_profile("runtime:sysbox-runc", FULL, 40).unsafe


def test_userns_container_has_a_private_cgroupns_few_capabilities_and_a_seccomp_deny_list() -> None:
    import json

    config = choose_profile("userns", FULL, 40).host_config()
    assert config["CgroupnsMode"] == "private"
    assert config["CapDrop"] == ["ALL"]
    for dangerous in ("SYS_MODULE", "SYS_TIME", "SYS_BOOT", "SYS_RAWIO", "DAC_READ_SEARCH", "SYS_RESOURCE"):
        assert dangerous not in config["CapAdd"], dangerous
    assert "Privileged" not in config
    (seccomp,) = [o.removeprefix("seccomp=") for o in config["SecurityOpt"] if o.startswith("seccomp=")]
    profile = json.loads(seccomp)
    assert profile["defaultAction"] == "SCMP_ACT_ALLOW"
    denied = {name for rule in profile["syscalls"] for name in rule["names"] if rule["action"] == "SCMP_ACT_ERRNO"}
    assert {"open_by_handle_at", "init_module", "finit_module", "kexec_load", "reboot", "clock_settime"} <= denied
    # 32-bit calls go through the same filter.
    assert "SCMP_ARCH_X86" in profile["archMap"][0]["subArchitectures"]


def test_uid_ranges_are_disjoint_above_100000_and_below_2_32() -> None:
    from workers.privilege import PROBE_SLOT, USERNS_SIZE, USERNS_SLOTS, free_slot, slot_base

    assert slot_base(0) == 100_000
    assert slot_base(1) - slot_base(0) == USERNS_SIZE == 65_536
    assert slot_base(USERNS_SLOTS - 1) + USERNS_SIZE - 1 <= 2**32 - 1
    with pytest.raises(ValueError):
        slot_base(USERNS_SLOTS)
    with pytest.raises(ValueError):
        slot_base(-1)
    assert free_slot([]) == 0
    assert free_slot([0, 1, 3]) == 2
    # The probe's slot is never a desktop's.
    with pytest.raises(ValueError, match="taken"):
        free_slot(range(PROBE_SLOT))


def test_userns_desktops_learn_their_range_and_others_nothing() -> None:
    userns = choose_profile("userns", FULL, 40)
    assert userns.desktop_env(2) == [f"ORCH_USERNS_BASE={100_000 + 2 * 65_536}", "ORCH_USERNS_SIZE=65536"]
    with pytest.raises(ValueError):
        userns.desktop_env(None)
    assert choose_profile("caps", FULL, 40).desktop_env(None) == []
    assert userns.probe_config()["Entrypoint"] == ["userns-desktop", "--probe"]
    assert choose_profile("caps", FULL, 40).probe_config()["Entrypoint"] == ["true"]


def test_slot_labels_are_parsed_strictly() -> None:
    from workers.privilege import LABEL_USERNS_SLOT, USERNS_SLOTS, parse_slot

    assert parse_slot({LABEL_USERNS_SLOT: "7"}) == 7
    for bad in ("", "-1", "x", str(USERNS_SLOTS), "٣"):
        assert parse_slot({LABEL_USERNS_SLOT: bad}) is None, bad
    assert parse_slot({}) is None
