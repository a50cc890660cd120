from __future__ import annotations

import pytest

from workers.firewall import LINK_LOCAL, connected_networks, plan

ROUTES = """Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT
eth0\t00000000\t010012AC\t0003\t0\t0\t0\t00000000\t0\t0\t0
eth0\t000012AC\t00000000\t0001\t0\t0\t0\t0000FFFF\t0\t0\t0
eth1\t00C0A8C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0
docker0\t0000D50A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0
br-4d062c499c34\t0001D50A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0
"""


def test_connected_networks_are_the_sandboxes_own_not_dockers_nor_the_default_route() -> None:
    assert connected_networks(ROUTES) == ["172.18.0.0/16", "192.168.192.0/24"]


def test_the_plan_drops_new_connections_to_the_sandbox_and_forwarding_to_its_networks() -> None:
    rules = plan("br-abc", ["172.18.0.0/16"])
    assert rules[0] == ["INPUT", "-i", "br-abc", "-m", "conntrack", "--ctstate", "NEW", "-j", "DROP"]
    forwarded = {r[4] for r in rules[1:]}
    assert forwarded == {"172.18.0.0/16", LINK_LOCAL}
    assert all(r[:3] == ["DOCKER-USER", "-i", "br-abc"] and r[-2:] == ["-j", "DROP"] for r in rules[1:])


@pytest.mark.parametrize("bad", ["--flush", "10.0.0.0/33", "x"])
def test_the_plan_refuses_what_is_not_a_network(bad: str) -> None:
    with pytest.raises(ValueError):
        plan("br-abc", [bad])
