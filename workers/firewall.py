"""Keep desktops away from their sandbox's own networks.

A desktop's traffic leaves through its sandbox's NAT, so without rules it reaches whatever the
sandbox reaches: Redis, the API, the registry (no auth: it could overwrite images), the
sandbox's own ports (the worker's metrics). Two kinds of rules, in the sandbox's network
namespace, on the desktops' bridge only:
- ``DOCKER-USER`` (forwarded traffic, consulted by dockerd before its own rules): drop what goes
  to the sandbox's directly connected networks (the compose or pod network), link-local
  addresses (cloud metadata) and any networks the operator lists (ORCH_DESKTOP_DENY);
- ``INPUT``: drop new connections from desktops to the sandbox itself.
Everything else (the internet, if the sandbox has it) still works, and desktops never reached
each other anyway (the bridge has inter-container traffic off).

``plan`` and ``connected_networks`` are pure; ``apply`` runs iptables, idempotently (``-C``
before ``-I``), so it can run on every reconcile pass and restore what a restart dropped.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import struct
from collections.abc import Iterable, Sequence
from pathlib import Path

log = logging.getLogger("workers.firewall")

# Interfaces whose networks are Docker's own (the desktops' side), not the sandbox's.
_DOCKER_IFACES = ("lo", "docker", "br-", "veth")
LINK_LOCAL = "169.254.0.0/16"


def connected_networks(route_table: str) -> list[str]:
    """The directly connected IPv4 networks of ``/proc/net/route`` (text), Docker's excluded."""
    networks = []
    for line in route_table.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 8:
            continue
        iface, destination, gateway, mask = fields[0], fields[1], fields[2], fields[7]
        if iface.startswith(_DOCKER_IFACES) or int(gateway, 16) != 0 or int(destination, 16) == 0:
            continue
        address = socket.inet_ntoa(struct.pack("<L", int(destination, 16)))
        netmask = socket.inet_ntoa(struct.pack("<L", int(mask, 16)))
        networks.append(str(ipaddress.IPv4Network(f"{address}/{netmask}", strict=False)))
    return sorted(set(networks))


def plan(bridge: str, denied: Iterable[str]) -> list[list[str]]:
    """The iptables rules (arguments after the verb) for the desktops' ``bridge``."""
    rules = [["INPUT", "-i", bridge, "-m", "conntrack", "--ctstate", "NEW", "-j", "DROP"]]
    for network in sorted(set(denied) | {LINK_LOCAL}):
        ipaddress.ip_network(network)  # refuse anything that is not a network (no flag injection)
        rules.append(["DOCKER-USER", "-i", bridge, "-d", network, "-j", "DROP"])
    return rules


async def _iptables(*args: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        "iptables", "-w", "5", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await proc.communicate()
    return proc.returncode or 0, out.decode(errors="replace").strip()


async def apply(bridge: str, extra_denied: Sequence[str]) -> int:
    """Make sure every rule is in place; returns how many were added. Raises RuntimeError
    when iptables refuses (no NET_ADMIN, no DOCKER-USER chain yet)."""
    routes = await asyncio.to_thread(Path("/proc/net/route").read_text)
    denied = [*connected_networks(routes), *extra_denied]
    added = 0
    for rule in plan(bridge, denied):
        chain, spec = rule[0], rule[1:]
        code, _ = await _iptables("-C", chain, *spec)
        if code == 0:
            continue
        code, out = await _iptables("-I", chain, *spec)
        if code != 0:
            raise RuntimeError(f"iptables -I {' '.join(rule)} failed: {out}")
        added += 1
    if added:
        log.info("desktops on %s: %d firewall rules added (denied: %s)", bridge, added, ", ".join(denied))
    return added
