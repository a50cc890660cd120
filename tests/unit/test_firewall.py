"""The desktops' firewall, pure: what ``plan`` denies and lets through, on the route tables a
sandbox meets (compose, Calico and flannel pods), and the iptables input it becomes."""

from __future__ import annotations

import ipaddress

import pytest

from orchestrator.names import address_pool
from workers.firewall import (
    CHAIN,
    DESKTOP_IFACES,
    INPUT_CHAIN,
    Facts,
    Rule,
    Verdict,
    connected_networks,
    decide,
    jumps_v4,
    jumps_v6,
    nameservers,
    plan,
    restore_v4,
    restore_v6,
    routed_networks,
)

HEADER = "Iface\tDestination\tGateway\tFlags\tRefCnt\tUse\tMetric\tMask\tMTU\tWindow\tIRTT\n"


def row(iface: str, destination: str, gateway: str, mask: str) -> str:
    return f"{iface}\t{destination}\t{gateway}\t0003\t0\t0\t0\t{mask}\t0\t0\t0\n"


# Compose: eth0 172.18.0.0/16 via the machine at 172.18.0.1, a second network, Docker's bridges.
COMPOSE = (
    HEADER
    + row("eth0", "00000000", "010012AC", "00000000")
    + row("eth0", "000012AC", "00000000", "0000FFFF")
    + row("eth1", "00C0A8C0", "00000000", "00FFFFFF")
    + row("docker0", "0000D50A", "00000000", "00FFFFFF")
    + row("br-4d062c499c34", "0001D50A", "00000000", "00FFFFFF")
)
# Calico: default via 169.254.1.1, the pod's /32; flannel 10.244.1.5/24, other nodes routed.
CALICO = HEADER + row("eth0", "00000000", "0101FEA9", "00000000") + row("eth0", "0101FEA9", "00000000", "FFFFFFFF")
FLANNEL = (
    HEADER
    + row("eth0", "00000000", "0101F40A", "00000000")
    + row("eth0", "0001F40A", "00000000", "00FFFFFF")
    + row("eth0", "0000F40A", "0101F40A", "0000FFFF")
)
KUBE_DNS = "search orchestrator.svc.cluster.local svc.cluster.local\nnameserver 10.96.0.10\noptions ndots:5\n"
COMPOSE_DNS = "nameserver 127.0.0.11\noptions ndots:0\n"
# Where a cluster's Redis, registry, API and Services live (10.96.0.1: the API server), other
# nodes, a LAN, CGNAT, cloud metadata (AWS, Alibaba).
MUST_NOT_REACH = [
    "10.96.0.1",
    "10.244.2.7",
    "172.20.0.5",
    "192.168.1.10",
    "100.64.0.10",
    "100.100.100.200",
    "169.254.169.254",
    "127.0.0.1",
]
POOL = address_pool(1)  # the sandbox's dockerd at depth 1: the desktops' own network is in it


def facts(
    routes: str, resolv_conf: str = COMPOSE_DNS, deny: tuple[str, ...] = (), allow: tuple[str, ...] = ()
) -> Facts:
    return Facts(pool=POOL, routes=routes, resolv_conf=resolv_conf, deny=deny, allow=allow)


def test_connected_networks_are_the_sandboxes_own_not_dockers_nor_the_default_route() -> None:
    assert connected_networks(COMPOSE) == ["172.18.0.0/16", "192.168.192.0/24"]


def test_routed_networks_add_what_a_gateway_reaches_and_the_gateways() -> None:
    assert routed_networks(FLANNEL) == ["10.244.0.0/16", "10.244.1.0/24", "10.244.1.1/32"]
    assert routed_networks(CALICO) == ["169.254.1.1/32"]
    assert routed_networks(COMPOSE) == ["172.18.0.0/16", "172.18.0.1/32", "192.168.192.0/24"]


@pytest.mark.parametrize("routes", [COMPOSE, CALICO, FLANNEL], ids=["compose", "calico", "flannel"])
@pytest.mark.parametrize("address", MUST_NOT_REACH)
def test_desktops_are_denied_every_private_range_whatever_the_routes(routes: str, address: str) -> None:
    """H2 and M10: what a pod only routes to (or not at all) is denied as well as what it is on."""
    assert decide(plan(facts(routes, KUBE_DNS)), address) is Verdict.DROP


@pytest.mark.parametrize("routes", [COMPOSE, CALICO, FLANNEL], ids=["compose", "calico", "flannel"])
def test_the_internet_the_own_pool_and_dns_stay_open(routes: str) -> None:
    rules = plan(facts(routes, KUBE_DNS))
    for address in ("1.1.1.1", "151.101.1.69", "8.8.8.8"):
        assert decide(rules, address) is Verdict.RETURN, address
    # The desktops' own network: Docker's rules decide there (inter-container traffic is off).
    assert decide(rules, "10.213.1.7") is Verdict.RETURN
    # Docker's resolver in a desktop asks the pod's cluster DNS from the desktop's namespace.
    assert decide(rules, "10.96.0.10", "udp", 53) is Verdict.RETURN
    assert decide(rules, "10.96.0.10", "tcp", 53) is Verdict.RETURN
    # ... and nothing else of it.
    assert decide(rules, "10.96.0.10", "tcp", 443) is Verdict.DROP
    assert decide(rules, "10.96.0.11", "udp", 53) is Verdict.DROP


def test_every_depth_keeps_its_own_pool_and_denies_the_one_above() -> None:
    """A nested sandbox (depth 3, in a desktop) lets its desktops use 10.215/16 and keeps them
    off 10.214/16, where the desktop running it has its compose network (its Redis)."""
    rules = plan(Facts(pool=address_pool(3), routes=HEADER + row("eth0", "0000D60A", "00000000", "00FFFFFF")))
    assert decide(rules, "10.215.4.2") is Verdict.RETURN
    assert decide(rules, "10.214.0.5") is Verdict.DROP
    assert decide(rules, "10.213.1.2") is Verdict.DROP


def test_loopback_nameservers_need_no_hole() -> None:
    """compose's 127.0.0.11 is asked from the sandbox's side, not forwarded."""
    assert nameservers(COMPOSE_DNS) == []
    assert nameservers(KUBE_DNS + "nameserver fd00::10\nnameserver bogus\n") == ["10.96.0.10"]
    assert all(r.port != 53 for r in plan(facts(COMPOSE)))


def test_the_allow_list_wins_and_the_deny_list_adds() -> None:
    rules = plan(facts(COMPOSE, allow=("10.20.30.0/24",), deny=("203.0.114.0/24", "fd00::/8")))
    assert decide(rules, "10.20.30.40") is Verdict.RETURN
    assert decide(rules, "10.20.31.40") is Verdict.DROP
    assert decide(rules, "203.0.114.9") is Verdict.DROP
    assert all(r.destination is None or ipaddress.ip_network(r.destination).version == 4 for r in rules)


@pytest.mark.parametrize("bad", ["--flush", "10.0.0.0/33", "x"])
def test_the_plan_refuses_what_is_not_a_network(bad: str) -> None:
    with pytest.raises(ValueError):
        plan(facts(COMPOSE, deny=(bad,)))
    with pytest.raises(ValueError):
        plan(facts(COMPOSE, allow=(bad,)))


def test_the_restore_input_replaces_both_chains_and_drops_new_connections_to_the_sandbox() -> None:
    rules = [Rule(Verdict.RETURN, "10.96.0.10/32", "udp", 53), Rule(Verdict.DROP, "10.0.0.0/8")]
    assert restore_v4(rules).splitlines() == [
        "*filter",
        f":{CHAIN} - [0:0]",
        f":{INPUT_CHAIN} - [0:0]",
        f"-A {CHAIN} -d 10.96.0.10/32 -p udp --dport 53 -j RETURN",
        f"-A {CHAIN} -d 10.0.0.0/8 -j DROP",
        f"-A {INPUT_CHAIN} -m conntrack --ctstate NEW -j DROP",
        "COMMIT",
    ]
    # Every bridge of the sandbox's dockerd jumps there, forwarded and to the sandbox itself.
    assert sorted(jumps_v4()) == sorted(
        [["DOCKER-USER", "-i", i, "-j", CHAIN] for i in DESKTOP_IFACES]
        + [["INPUT", "-i", i, "-j", INPUT_CHAIN] for i in DESKTOP_IFACES]
    )


def test_ipv6_from_the_bridges_is_dropped_whole() -> None:
    """Desktops have no IPv6 network: no ULA, link-local, ::1 or the machine's v6 addresses,
    since nothing IPv6 leaves a bridge, forwarded (or bridged) or to the sandbox itself."""
    assert restore_v6().splitlines() == ["*filter", f":{CHAIN} - [0:0]", f"-A {CHAIN} -j DROP", "COMMIT"]
    assert sorted(jumps_v6()) == sorted(
        [[chain, "-i", i, "-j", CHAIN] for chain in ("INPUT", "FORWARD") for i in DESKTOP_IFACES]
    )


def test_the_sandboxes_own_network_is_denied_even_inside_its_pool() -> None:
    """On a machine whose dockerd shares the sandbox's pool (10.213.0.0/24 on eth0), the
    sandbox's network is still denied while the desktops' network in the same /16 is not."""
    routes = HEADER + row("eth0", "00000000", "0100D50A", "00000000") + row("eth0", "0000D50A", "00000000", "00FFFFFF")
    rules = plan(facts(routes))
    assert decide(rules, "10.213.0.1") is Verdict.DROP
    assert decide(rules, "10.213.0.7") is Verdict.DROP
    assert decide(rules, "10.213.1.7") is Verdict.RETURN
