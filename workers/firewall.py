"""Keep desktops off everything but the internet: fail closed.

A desktop's traffic leaves through its sandbox's NAT, so without rules it reaches whatever the
sandbox reaches: Redis, the API, the registry, the sandbox's own ports (the worker's metrics), a
cluster's Services and nodes, the machine's LAN, cloud metadata. The rules live in the sandbox's
network namespace and match every bridge of the sandbox's dockerd (``br-+``: the desktops'
network; ``docker0``), so they hold before that network exists and need no name from dockerd.

IPv4, chain ``ORCH-DESKTOPS`` (jumped to from ``DOCKER-USER``, which dockerd consults first for
forwarded traffic and never flushes), first match wins:
- RETURN (Docker's own rules decide) for DNS to the sandbox's own nameservers (a Kubernetes pod's
  cluster DNS: Docker's resolver in a desktop forwards there from the desktop's namespace) and
  the operator's allow-list (``ORCH_DESKTOP_ALLOW``);
- DROP for every network the sandbox has a route to (connected or routed: a pod's cluster
  ranges) and its gateways (the machine or node, whatever its address);
- RETURN for the sandbox dockerd's own address pool (the desktops' network, where Docker's
  inter-container rule keeps desktops apart);
- DROP for every private or special range (RFC 1918, 100.64/10, link-local, loopback,
  multicast, reserved) and ``ORCH_DESKTOP_DENY``.
Everything else (the internet, if the sandbox has it) is left to Docker. Chain
``ORCH-DESKTOPS-IN`` (from ``INPUT``) drops new connections to the sandbox itself, on any of
its addresses.

IPv6: desktops have no IPv6 network, but under ``privileged`` and ``caps`` a desktop can turn
IPv6 on in its own namespace and talk link-local (``fe80::``) to its sandbox or to other
desktops on the bridge. So every IPv6 packet from the bridges is dropped (``ORCH-DESKTOPS`` of
ip6tables, from ``INPUT`` and ``FORWARD``; bridged frames pass ``FORWARD`` once
``bridge-nf-call-ip6tables`` is on, which ``apply`` sets).

sandbox-init runs ``python -m workers.firewall`` before it starts dockerd, so desktops that
dockerd restarts (restart policies) never run unfiltered, Redis up or not; the worker applies
the same rules at start and on every reconcile pass (restoring what a person removed).
``plan`` is pure; ``apply`` loads each chain whole with ``iptables-restore --noflush`` (one
transaction: no moment with half the rules) and adds the jumps idempotently (``-C`` before ``-I``).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import struct
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from orchestrator.config import WorkerSettings
from orchestrator.names import address_pool

log = logging.getLogger("workers.firewall")

# Interfaces whose networks are Docker's own (the desktops' side), not the sandbox's.
_DOCKER_IFACES = ("lo", "docker", "br-", "veth")
# The sandbox dockerd's bridges: every container it runs is a desktop (or as untrusted as one).
DESKTOP_IFACES = ("br-+", "docker0")
CHAIN = "ORCH-DESKTOPS"
INPUT_CHAIN = "ORCH-DESKTOPS-IN"
LINK_LOCAL = "169.254.0.0/16"
# Private and special-purpose IPv4 ranges (RFC 6890): where clusters, LANs, the machine and
# cloud metadata (169.254.169.254, Alibaba's 100.100.100.200) live. Denied unless allowed.
PRIVATE = (
    "0.0.0.0/8",
    "10.0.0.0/8",
    "100.64.0.0/10",
    "127.0.0.0/8",
    LINK_LOCAL,
    "172.16.0.0/12",
    "192.0.0.0/24",
    "192.0.2.0/24",
    "192.168.0.0/16",
    "198.18.0.0/15",
    "198.51.100.0/24",
    "203.0.113.0/24",
    "224.0.0.0/4",
    "240.0.0.0/4",
)
BRIDGE_NF_IP6 = Path("/proc/sys/net/bridge/bridge-nf-call-ip6tables")


class Verdict(StrEnum):
    RETURN = "RETURN"  # not ours to stop: Docker's own rules decide
    DROP = "DROP"


@dataclass(frozen=True)
class Rule:
    """One rule of ``CHAIN``: the first whose match fits a packet decides it."""

    verdict: Verdict
    destination: str | None = None  # an IPv4 network; None: any
    protocol: str | None = None  # udp, tcp (with ``port``)
    port: int | None = None
    why: str = ""

    def args(self) -> list[str]:
        args: list[str] = []
        if self.destination is not None:
            args += ["-d", self.destination]
        if self.protocol is not None:
            args += ["-p", self.protocol]
            if self.port is not None:
                args += ["--dport", str(self.port)]
        return [*args, "-j", self.verdict.value]

    def __str__(self) -> str:
        port = f" {self.protocol}/{self.port}" if self.port is not None else ""
        return f"{self.verdict.value.lower()} {self.destination or 'any'}{port}"


@dataclass(frozen=True)
class Facts:
    """What the rules are made from: the sandbox's settings and what it sees of its namespace."""

    pool: str  # the sandbox dockerd's address pool (orchestrator.names.address_pool)
    routes: str = ""  # /proc/net/route
    resolv_conf: str = ""  # /etc/resolv.conf
    deny: Sequence[str] = ()  # ORCH_DESKTOP_DENY
    allow: Sequence[str] = ()  # ORCH_DESKTOP_ALLOW
    ipv6: bool = True  # the kernel has IPv6 (else there is nothing to close)


def _ipv4(networks: Iterable[str]) -> list[str]:
    """Valid IPv4 networks only (``ip_network`` refuses anything else: no flag injection)."""
    parsed = [ipaddress.ip_network(network, strict=False) for network in networks]
    return [str(network) for network in parsed if network.version == 4]


def _routes(route_table: str) -> list[tuple[str, str, str]]:
    """(iface, destination network, gateway) of ``/proc/net/route``, Docker's interfaces left out."""
    rows = []
    for line in route_table.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 8 or fields[0].startswith(_DOCKER_IFACES):
            continue
        destination, gateway, mask = (
            socket.inet_ntoa(struct.pack("<L", int(f, 16))) for f in (*fields[1:3], fields[7])
        )
        rows.append((fields[0], str(ipaddress.IPv4Network(f"{destination}/{mask}", strict=False)), gateway))
    return rows


def connected_networks(route_table: str) -> list[str]:
    """The directly connected IPv4 networks of ``/proc/net/route`` (text), Docker's excluded."""
    return sorted({net for _, net, gw in _routes(route_table) if gw == "0.0.0.0" and net != "0.0.0.0/0"})


def routed_networks(route_table: str) -> list[str]:
    """Every network the sandbox has a route to but the default one (connected or through a
    gateway: a flannel pod's cluster /16), and each gateway's address (the node, the machine)."""
    out = set()
    for _, net, gateway in _routes(route_table):
        if net != "0.0.0.0/0":
            out.add(net)
        if gateway != "0.0.0.0":
            out.add(f"{gateway}/32")
    return sorted(out)


def nameservers(resolv_conf: str) -> list[str]:
    """The IPv4 nameservers a desktop's DNS is forwarded to from its own namespace (loopback
    ones, like compose's 127.0.0.11, are asked from the sandbox's side and need no hole)."""
    servers = []
    for line in resolv_conf.splitlines():
        fields = line.split()
        if len(fields) >= 2 and fields[0] == "nameserver":
            try:
                address = ipaddress.ip_address(fields[1])
            except ValueError:
                continue
            if address.version == 4 and not address.is_loopback:
                servers.append(str(address))
    return servers


def plan(facts: Facts) -> list[Rule]:
    """The rules of ``CHAIN`` (IPv4), in order, first match wins: DNS and the operator's
    allow-list; the sandbox's routes denied (before the pool: where the sandbox's own network
    overlaps its dockerd's pool, the sandbox's network wins); the desktops' own pool left to
    Docker; every other private range denied, and ORCH_DESKTOP_DENY."""
    rules = [
        Rule(Verdict.RETURN, f"{server}/32", proto, 53, "DNS")
        for server in nameservers(facts.resolv_conf)
        for proto in ("udp", "tcp")
    ]
    rules += [Rule(Verdict.RETURN, net, why="ORCH_DESKTOP_ALLOW") for net in _ipv4(facts.allow)]
    rules += [Rule(Verdict.DROP, net, why="the sandbox's routes") for net in routed_networks(facts.routes)]
    rules.append(Rule(Verdict.RETURN, str(ipaddress.ip_network(facts.pool)), why="the desktops' own pool"))
    denied = sorted(set(_ipv4(PRIVATE)) | set(_ipv4(facts.deny)))
    rules += [Rule(Verdict.DROP, net, why="private, special or ORCH_DESKTOP_DENY") for net in denied]
    return rules


def decide(rules: Sequence[Rule], destination: str, protocol: str = "tcp", port: int = 80) -> Verdict:
    """What ``rules`` do with a new packet from a desktop (the chain's semantics, for tests)."""
    address = ipaddress.ip_address(destination)
    for rule in rules:
        if rule.destination is not None and address not in ipaddress.ip_network(rule.destination):
            continue
        if rule.protocol is not None and (rule.protocol != protocol or rule.port not in (None, port)):
            continue
        return rule.verdict
    return Verdict.RETURN


def restore_v4(rules: Sequence[Rule]) -> str:
    """``iptables-restore --noflush`` input: both chains replaced whole, nothing else touched."""
    lines = ["*filter", f":{CHAIN} - [0:0]", f":{INPUT_CHAIN} - [0:0]"]
    lines += [" ".join(["-A", CHAIN, *rule.args()]) for rule in rules]
    lines.append(f"-A {INPUT_CHAIN} -m conntrack --ctstate NEW -j DROP")
    return "\n".join([*lines, "COMMIT", ""])


def restore_v6() -> str:
    """No IPv6 for desktops at all: whatever comes from a bridge is dropped."""
    return "\n".join(["*filter", f":{CHAIN} - [0:0]", f"-A {CHAIN} -j DROP", "COMMIT", ""])


def jumps_v4() -> list[list[str]]:
    return [
        *(["DOCKER-USER", "-i", iface, "-j", CHAIN] for iface in DESKTOP_IFACES),
        *(["INPUT", "-i", iface, "-j", INPUT_CHAIN] for iface in DESKTOP_IFACES),
    ]


def jumps_v6() -> list[list[str]]:
    return [[chain, "-i", iface, "-j", CHAIN] for chain in ("INPUT", "FORWARD") for iface in DESKTOP_IFACES]


async def _run(*args: str, stdin: str | None = None) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        *args,
        stdin=asyncio.subprocess.PIPE if stdin is not None else None,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await proc.communicate(stdin.encode() if stdin is not None else None)
    return proc.returncode or 0, out.decode(errors="replace").strip()


async def _load(tool: str, text: str, jumps: Sequence[Sequence[str]], new_chains: Sequence[str]) -> None:
    """Chains replaced in one transaction, then the jumps to them, each added once (at the top)."""
    for chain in new_chains:  # DOCKER-USER before dockerd made it (dockerd keeps its rules)
        code, _ = await _run(tool, "-w", "5", "-n", "-L", chain)
        if code != 0:
            code, out = await _run(tool, "-w", "5", "-N", chain)
            if code != 0 and "exists" not in out:
                raise RuntimeError(f"{tool} -N {chain} failed: {out}")
    code, out = await _run(f"{tool}-restore", "-w", "5", "--noflush", stdin=text)
    if code != 0:
        raise RuntimeError(f"{tool}-restore failed: {out}")
    for jump in jumps:
        if (await _run(tool, "-w", "5", "-C", *jump))[0] == 0:
            continue
        code, out = await _run(tool, "-w", "5", "-I", jump[0], "1", *jump[1:])
        if code != 0:
            raise RuntimeError(f"{tool} -I {' '.join(jump)} failed: {out}")


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def facts_of(settings: WorkerSettings) -> Facts:
    """The sandbox's facts, read now (routes change: a pod's network comes up late)."""
    return Facts(
        pool=address_pool(settings.depth),
        routes=_read("/proc/net/route"),
        resolv_conf=_read("/etc/resolv.conf"),
        deny=settings.desktop_deny,
        allow=settings.desktop_allow,
        ipv6=Path("/proc/net/if_inet6").exists(),
    )


_applied: str | None = None  # what this process loaded last, to log changes only


async def apply(facts: Facts) -> list[Rule]:
    """Make the rules what ``plan`` says (both chains reloaded whole); returns them. Raises
    RuntimeError when iptables refuses (no NET_ADMIN, say): the caller fails closed."""
    global _applied
    rules = plan(facts)
    text = restore_v4(rules)
    await _load("iptables", text, jumps_v4(), ["DOCKER-USER"])
    if facts.ipv6:
        # Bridged frames (desktop to desktop) only meet ip6tables with this on; per namespace.
        # A sandbox with Docker's read-only /proc/sys gets it as a sysctl of its container
        # (docker-compose.yml): written only when it is not on already.
        try:
            if (await asyncio.to_thread(BRIDGE_NF_IP6.read_text)).strip() != "1":
                await asyncio.to_thread(BRIDGE_NF_IP6.write_text, "1")
        except OSError as e:
            log.warning("could not set %s (%s): desktops may reach each other over IPv6", BRIDGE_NF_IP6, e)
        await _load("ip6tables", restore_v6(), jumps_v6(), [])
        text += restore_v6()
    if text != _applied:
        log.info(
            "desktops' firewall loaded: %s; IPv6 %s",
            ", ".join(map(str, rules)),
            "closed" if facts.ipv6 else "absent (no IPv6 in this kernel)",
        )
        _applied = text
    return rules


def main() -> None:
    """``python -m workers.firewall``: load the rules now (sandbox-init, before dockerd)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s firewall: %(message)s", stream=sys.stderr)
    try:
        asyncio.run(apply(facts_of(WorkerSettings.from_env())))
    except (RuntimeError, ValueError) as e:
        log.error("%s", e)
        sys.exit(1)


if __name__ == "__main__":
    main()
