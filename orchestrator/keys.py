"""The Redis key layout: every key the project writes, under one prefix, in one place.

docs/architecture.md has the map (each key's writer, reader and TTL). arq's own keys
(``arq:job:<id>``, ``arq:in-progress:<id>``, ``arq:result:<id>``) are fixed by arq."""

from __future__ import annotations

from .names import DEFAULT_TENANT


def job_id(operation: str, session_id: str, generation: int) -> str:
    """The same (operation, session, generation) enqueued twice runs once."""
    return f"{operation}:{session_id}:{generation}"


def queue_wake(queue: str) -> str:
    """A queue's wake-up list, next to it: every enqueue pushes one element (trimmed to one, with
    a TTL), and the queue's worker waits on it with ``BLPOP`` instead of polling (workers/jobs.py)."""
    return f"{queue}:wake"


class Keys:
    """Redis keys, all under one prefix."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    def session(self, session_id: str) -> str:
        return f"{self.prefix}session:{session_id}"

    def session_env(self, session_id: str) -> str:
        return f"{self.prefix}session-env:{session_id}"

    def session_alias(self, session_id: str) -> str:
        """A derived id (an Idempotency-Key's, a create command's) whose create claimed a warm
        desktop, which has an id of its own: the id it became (TTL), so a retry finds it."""
        return f"{self.prefix}session-alias:{session_id}"

    def session_deleted(self, session_id: str) -> str:
        """A deleted session's tombstone (TTL): the evidence that lets the reconciler remove
        its leftover desktop or volume. Written by the DELETED transition, dropped by a new record."""
        return f"{self.prefix}session-deleted:{session_id}"

    def lock(self, session_id: str) -> str:
        return f"{self.prefix}lock:{session_id}"

    @property
    def session_index(self) -> str:
        return f"{self.prefix}sessions"

    @property
    def firehose(self) -> str:
        return f"{self.prefix}events"

    def session_events(self, session_id: str) -> str:
        return f"{self.prefix}events:session:{session_id}"

    def tenant_sessions(self, tenant: str) -> str:
        """Ids of the tenant's sessions not deleted: what its quota (ORCH_TENANT_MAX_SESSIONS)
        counts. Kept by the store's scripts with the record, as the ``placed`` sets are."""
        return f"{self.prefix}tenant-sessions:{tenant}"

    def sandbox(self, sandbox_id: str) -> str:
        return f"{self.prefix}sandbox:{sandbox_id}"

    @property
    def sandbox_index(self) -> str:
        return f"{self.prefix}sandboxes"

    def queue(self, sandbox_id: str) -> str:
        return f"{self.prefix}queue:{sandbox_id}"

    def queue_wake(self, sandbox_id: str) -> str:
        """The sandbox queue's wake-up list (``queue:<sandbox>:wake``): sandbox ids have no colon."""
        return queue_wake(self.queue(sandbox_id))

    def commands(self, tenant: str | None = None) -> str:
        """The command stream producers write (``XADD ... * command <json>``, docs/jobs.md): one
        for the default tenant, one per other tenant (each producer's ACL user holds its own).
        Read by the API processes' consumer group ``control``; each entry deleted once handled."""
        return f"{self.prefix}commands" if tenant in (None, DEFAULT_TENANT) else f"{self.prefix}commands:{tenant}"

    def command_done(self, tenant: str, request_id: str) -> str:
        """A handled command's outcome (JSON), so the same ``request_id`` again acts once. TTL a day."""
        return f"{self.prefix}command-done:{tenant}:{request_id}"

    # -- execs (orchestrator/exec_store.py) --------------------------------------------------

    def exec(self, exec_id: str) -> str:
        """An exec's record (JSON, ExecRecord): TTL its timeout plus ORCH_EXEC_KEEP while it
        may still run, ORCH_EXEC_KEEP once it ended."""
        return f"{self.prefix}exec:{exec_id}"

    def exec_output(self, exec_id: str) -> str:
        """An exec's output (stream: ``s`` stdout|stderr, ``d`` bytes; the last entry ``end``,
        the final record). Expires with the record."""
        return f"{self.prefix}exec-output:{exec_id}"

    def exec_lease(self, exec_id: str) -> str:
        """Held (PX) by the worker running the exec: a running exec without it has lost its worker."""
        return f"{self.prefix}exec-lease:{exec_id}"

    def exec_jobs(self, sandbox_id: str) -> str:
        """The sandbox's exec requests (stream, consumer group ``workers``): written by the API,
        each entry removed once its worker has handled it (it holds env and stdin)."""
        return f"{self.prefix}exec-jobs:{sandbox_id}"

    def exec_control(self, sandbox_id: str) -> str:
        """Kill requests for the sandbox's running execs (stream, capped): every worker of the
        sandbox reads it, the one running the exec acts."""
        return f"{self.prefix}exec-control:{sandbox_id}"

    def session_execs(self, session_id: str) -> str:
        """Ids of the session's execs not ended (set): ORCH_EXEC_MAX_PER_SESSION counts them."""
        return f"{self.prefix}session-execs:{session_id}"

    # -- access into desktops (orchestrator/access.py) --------------------------------------

    def access_ticket(self, ticket_id: str) -> str:
        """An access's ticket (JSON, AccessTicket): written by the API, taken once (GETDEL) by
        the worker that does it. PX a few seconds: an untaken ticket opens nothing later."""
        return f"{self.prefix}access-ticket:{ticket_id}"

    def access_requests(self, sandbox_id: str) -> str:
        """Relayed accesses for the sandbox's workers (stream, consumer group ``workers``, capped):
        ``t`` the ticket's id. Each entry removed once a worker took it."""
        return f"{self.prefix}access-requests:{sandbox_id}"

    def relay(self, channel_id: str, side: str) -> str:
        """One direction of a relayed access's bytes (stream, ``k`` frame kind, ``d`` payload):
        ``a`` from the API, ``w`` from the worker; trimmed by its reader, PX 30 s after its last
        write (orchestrator/access_relay.py)."""
        return f"{self.prefix}relay:{channel_id}:{side}"

    def session_terminals(self, session_id: str) -> str:
        """The session's open terminals (sorted set: ticket id -> lease end, ms), renewed by the
        API process serving each: ORCH_TERMINAL_MAX_PER_SESSION counts the live ones."""
        return f"{self.prefix}session-terminals:{session_id}"

    def port_grant(self, digest: str) -> str:
        """A port URL's grant (JSON ``PortGrant``: session, port, issuer), under the SHA-256 of
        its token (never the token): TTL ORCH_PORT_URL_TTL (orchestrator/port_grants.py)."""
        return f"{self.prefix}port-grant:{digest}"

    def userns_slots(self, machine: str) -> str:
        """The machine's uid range ledger (hash: slot -> "session sandbox claimed_at"), keyed by
        the kernel's boot id: no two userns desktops of one machine get one range
        (workers/uid_ranges.py). Written and swept by the workers; no TTL."""
        return f"{self.prefix}userns-slots:{machine}"

    def userns_owners(self, machine: str) -> str:
        """The same ledger the other way (hash: session -> slot): a retried claim gets its slot back."""
        return f"{self.prefix}userns-owners:{machine}"

    def pool(self, sandbox_id: str, flavor: str = "minimal") -> str:
        """The sandbox's warm desktops of ``flavor``, ready and unclaimed: a list of their
        (pre-chosen) session ids. The minimal pool's key is the one of before flavors
        (``pool:<sandbox>``); the graphical one's is ``pool:<sandbox>:graphical`` (sandbox ids
        have no colon, so neither is another sandbox's)."""
        return f"{self.prefix}pool:{sandbox_id}" if flavor == "minimal" else f"{self.prefix}pool:{sandbox_id}:{flavor}"

    def pool_making(self, sandbox_id: str) -> str:
        """Ids of warm desktops being made, of every flavor (added before the first object): a
        leftover of one that never reached its pool list is the pool's own, never handed out,
        so removable."""
        return f"{self.prefix}pool-making:{sandbox_id}"

    def placed(self, sandbox_id: str) -> str:
        """Ids of the sessions placed on the sandbox and not deleted: what its cap counts."""
        return f"{self.prefix}placed:{sandbox_id}"

    def sandbox_alive(self, sandbox_id: str) -> str:
        """Set by every heartbeat with the sandbox's lost_after_s as expiry (Redis's clock)."""
        return f"{self.prefix}sandbox-alive:{sandbox_id}"

    def sandbox_drain(self, sandbox_id: str) -> str:
        """Present while the sandbox drains: "api" (stays drained until undrained) or "signal"."""
        return f"{self.prefix}sandbox-drain:{sandbox_id}"

    def sandbox_lost(self, sandbox_id: str) -> str:
        """Set once a silent sandbox has been declared unavailable (one declaration per outage)."""
        return f"{self.prefix}sandbox-lost:{sandbox_id}"

    def sandbox_retired(self, sandbox_id: str) -> str:
        """Set when an operator retires a sandbox that will not return: its heartbeats are
        refused from then on (it is listed nowhere). Kept: deleting it lets the id back in."""
        return f"{self.prefix}sandbox-retired:{sandbox_id}"
