"""Two sandboxes on one machine (two sandbox ids on the same real dockerd, one Redis): their
userns volumes get different uid ranges, the range is on the volume's label (what the desktop
starts from), and deleting a volume gives its range back."""

from __future__ import annotations

import uuid

import aiodocker
import redis.asyncio as aioredis

from orchestrator.keys import Keys
from orchestrator.names import volume_name
from workers.privilege import LABEL_USERNS_SLOT, PrivilegeKind, PrivilegeProfile
from workers.runtime.desktops import DockerDesktops
from workers.uid_ranges import RedisSlotLedger, machine_id


async def test_sandboxes_of_one_machine_give_their_volumes_distinct_ranges(docker_host: str, redis_url: str) -> None:
    prefix = f"uidl-{uuid.uuid4().hex[:10]}:"
    redis = aioredis.Redis.from_url(redis_url)
    run = uuid.uuid4().hex[:8]
    sessions = {f"sb-{run}-{x}": [f"uidl-{run}-{x}{i}" for i in range(3)] for x in "ab"}
    try:
        async with aiodocker.Docker(url=docker_host) as docker:
            sandboxes = {
                sandbox: DockerDesktops(
                    docker,
                    image="unused",
                    sandbox_id=sandbox,
                    depth=1,
                    socket_dir="/nonexistent",
                    profile=PrivilegeProfile(PrivilegeKind.USERNS, "test"),
                    ledger=RedisSlotLedger(redis, Keys(prefix), sandbox_id=sandbox, machine=machine_id()),
                )
                for sandbox in sessions
            }
            try:
                for i in range(3):  # interleaved, as two busy sandboxes would
                    for sandbox, desktops in sandboxes.items():
                        assert await desktops.ensure_volume(sessions[sandbox][i])
                labels = {
                    s: (await (await docker.volumes.get(volume_name(s))).show()).get("Labels") or {}
                    for ids in sessions.values()
                    for s in ids
                }
                slots = [int(v[LABEL_USERNS_SLOT]) for v in labels.values()]
                assert sorted(slots) == list(range(6)), labels  # each sandbox alone would use 0, 1, 2
                first_a = sessions[next(iter(sessions))][0]
                freed = int(labels[first_a][LABEL_USERNS_SLOT])
                desktops_a = sandboxes[next(iter(sessions))]
                assert await desktops_a.remove_volume(first_a)
                # The freed range is the next one given, to either sandbox.
                b, desktops_b = list(sandboxes.items())[1]
                again = f"uidl-{run}-b9"
                sessions[b].append(again)
                assert await desktops_b.ensure_volume(again)
                assert (await desktops_b.volumes.slots())[again] == freed
            finally:
                for sandbox, desktops in sandboxes.items():
                    for s in sessions[sandbox]:
                        await desktops.remove_volume(s)
    finally:
        stale = [key async for key in redis.scan_iter(match=f"{prefix}*")]
        if stale:
            await redis.delete(*stale)
        await redis.aclose()
