"""The replicas (pods) of one worker: a channel per pod, each session placed on the least-loaded one."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Awaitable, Callable, Collection

from coolfusion.orchestrator.worker_client import SessionLost, WorkerBusy, WorkerClient, WorkerFailed

logger = logging.getLogger(__name__)

Resolve = Callable[[], Awaitable[list[str]]]
Connect = Callable[[str], WorkerClient]

# Long enough for Kubernetes to take a dead pod out of the Service (readiness probes need ~10-30 s),
# short enough that a pod restarted at the same address takes sessions again soon.
FAILED_COOLDOWN_S = 30.0
# A hung DNS server must not hold requests up: the pods already known keep serving meanwhile.
_RESOLVE_TIMEOUT_S = 5.0
# An undelivered close is retried with growing pauses for this long; past it the worker's idle TTL
# (300 s by default) is the backstop, and a worker that stayed unreachable this long has most
# likely lost its sessions anyway.
CLOSE_RETRY_S = 120.0
_CLOSE_TIMEOUT_S = 2.0
_CLOSE_FIRST_PAUSE_S = 0.25
_CLOSE_MAX_PAUSE_S = 10.0
_DNS_SCHEME = "dns:///"


def split_host_port(address: str) -> tuple[str, int]:
    """`host:port`, `[ipv6]:port` or `dns:///host:port` -> (host, port); ValueError says what is wrong."""
    host, colon, port = address.removeprefix(_DNS_SCHEME).rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not (colon and host and port.isdigit() and 0 < int(port) < 65536):
        raise ValueError(f"{address!r} is not host:port")
    return host, int(port)


async def resolve_dns(address: str) -> list[str]:
    """The pods behind a headless Service: the A/AAAA records of `address`'s host, with its port."""
    host, port = split_host_port(address)
    lookup = asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    records = await asyncio.wait_for(lookup, _RESOLVE_TIMEOUT_S)
    return sorted({_join(str(record[4][0]), port) for record in records})


def _join(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def fixed(addresses: list[str]) -> Resolve:
    """A resolver for addresses known in advance (`replicas: static`, or one target gRPC resolves)."""

    async def resolve() -> list[str]:
        return list(addresses)

    return resolve


class ReplicaSet:
    """The pods serving one worker: a client (one channel) per pod and the sessions in flight on each.

    A session is placed on the pod with the fewest sessions in flight and stays there, since that
    pod holds its KV cache (docs/design.md section 5.3). Pods are re-resolved every `refresh_s` seconds,
    lazily, when sessions are placed or health is probed. A pod that failed is avoided while another
    can take the session, and is dialled on a new channel for its next one (`_redial`).
    """

    def __init__(
        self,
        name: str,
        resolve: Resolve,
        connect: Connect,
        refresh_s: float = 10.0,
        cooldown_s: float = FAILED_COOLDOWN_S,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.name = name
        self.problem = ""  # why no pod is known, for the reason a worker is dropped
        self._resolve = resolve
        self._connect = connect
        self._refresh_s = refresh_s
        self._cooldown_s = cooldown_s
        self._clock = clock
        self._pods: dict[str, WorkerClient] = {}  # by address, as last resolved
        # Sessions in flight per client; a pod that left stays here until its last session is released.
        self._sessions: dict[WorkerClient, int] = {}
        self._failed_at: dict[str, float] = {}  # by address: a pod restarted in place keeps its address
        # Pods whose current channel saw a failure; their next session gets a fresh channel (_redial).
        self._broken: set[str] = set()
        self._resolved_at: float | None = None
        self._lock = asyncio.Lock()
        self._closing: set[asyncio.Task] = set()  # background retries of undelivered closes

    @classmethod
    def of(cls, client: WorkerClient) -> ReplicaSet:
        """A set of one client made elsewhere (by a test or an embedding program)."""
        return cls(client.name, fixed([client.address]), lambda _: client)

    async def pods(self) -> list[WorkerClient]:
        """The clients of the current pods, in address order; re-resolved once `refresh_s` passed."""
        if self._refresh_due():
            async with self._lock:  # one lookup at a time; the others wait for its answer
                if self._refresh_due():
                    await self.refresh()
        return [self._pods[address] for address in sorted(self._pods)]

    async def acquire(self, exclude: Collection[WorkerClient] = ()) -> WorkerClient | None:
        """The pod for a new session: not failed, fewest sessions in flight, ties to the first
        address. None when every pod is in `exclude` (those a request already tried); a pod is
        excluded by address, so its fresh channel is not tried again by the same request."""
        tried = {c.address for c in exclude}
        candidates = [c for c in await self.pods() if c.address not in tried]
        if not candidates:
            return None
        # A failed pod still beats none: it may be back, and refusing would drop the worker for sure.
        client = min(candidates, key=lambda c: (self._is_failed(c), self._sessions[c]))
        if client.address in self._broken:
            client = await self._redial(client.address)
        self._sessions[client] += 1
        return client

    def release(self, client: WorkerClient) -> None:
        """Frees the place of a session that closed or moved."""
        if client in self._sessions:  # absent only once close() has run at shutdown
            self._sessions[client] -= 1

    def close_later(self, client: WorkerClient, session_id: str) -> None:
        """Retries, in the background, closing a session whose close could not be delivered; the
        session keeps its place on the pod (and the pod its channel) until the close lands."""
        task = asyncio.create_task(self._close_with_retries(client, session_id))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def _close_with_retries(self, client: WorkerClient, session_id: str) -> None:
        pause, give_up = _CLOSE_FIRST_PAUSE_S, self._clock() + CLOSE_RETRY_S
        try:
            while self._clock() + pause < give_up:
                await asyncio.sleep(pause)
                try:
                    await client.close(session_id, _CLOSE_TIMEOUT_S)
                    return
                except SessionLost:
                    return  # gone already
                except (WorkerFailed, WorkerBusy):
                    pause = min(2 * pause, _CLOSE_MAX_PAUSE_S)
            logger.warning("worker %s: gave up closing session %s at %s", self.name, session_id, client.address)
        finally:
            self.release(client)

    def mark_failed(self, client: WorkerClient) -> None:
        """Keeps new sessions off a pod that could not be reached while another pod can take them,
        until it leaves and comes back in DNS or the cooldown passes; its next session dials it
        afresh. A failure on a channel already replaced says nothing about the new one."""
        if self._pods.get(client.address) is not client:
            return
        self._failed_at[client.address] = self._clock()
        self._broken.add(client.address)

    async def refresh(self) -> None:
        """Re-resolves the pods: connects to new ones, closes the channels of those that left."""
        try:
            addresses = set(await self._resolve())
        except OSError as error:
            # Stale pods beat none: a call to a pod that is really gone fails over to another.
            self.problem = f"cannot resolve the replicas of {self.name}: {error!r}"
            logger.warning("%s; keeping %d known", self.problem, len(self._pods))
            return
        finally:
            self._resolved_at = self._clock()
        self.problem = "" if addresses else f"{self.name} resolved to no replica"
        for address in sorted(addresses - self._pods.keys()):
            logger.info("worker %s: replica %s joined", self.name, address)
            self._pods[address] = client = self._connect(address)
            self._sessions[client] = 0
        for address in sorted(self._pods.keys() - addresses):
            logger.info("worker %s: replica %s left", self.name, address)
            del self._pods[address]
            self._failed_at.pop(address, None)
            self._broken.discard(address)
        await self._close_idle_leavers()

    async def close(self) -> None:
        """Closes every channel (the orchestrator stops); pending close retries end with it."""
        for task in list(self._closing):
            task.cancel()
        await asyncio.gather(*self._closing, return_exceptions=True)
        clients = list(self._sessions)
        self._pods.clear()
        self._sessions.clear()
        await asyncio.gather(*(c.disconnect() for c in clients))

    def _refresh_due(self) -> bool:
        return self._resolved_at is None or self._clock() - self._resolved_at >= self._refresh_s

    def _is_failed(self, client: WorkerClient) -> bool:
        failed_at = self._failed_at.get(client.address)
        return failed_at is not None and self._clock() - failed_at < self._cooldown_s

    async def _redial(self, address: str) -> WorkerClient:
        """Replaces a failed pod's channel by a new one. gRPC holds a channel that failed to connect
        in reconnect backoff (1 s growing to 2 min) and fails every call at once meanwhile, so a pod
        restarted at the same address would stay unused for up to that long; a new channel dials at
        its first call. The old channel closes once its sessions in flight are released."""
        logger.info("worker %s: re-dialling replica %s, which failed", self.name, address)
        self._broken.discard(address)
        self._pods[address] = client = self._connect(address)
        self._sessions.setdefault(client, 0)  # a set made by `of` gets its one client back, sessions and all
        await self._close_idle_leavers()
        return client

    async def _close_idle_leavers(self) -> None:
        """Closes the channels no longer current (their pod left, or was re-dialled) once no session
        is on them (closing earlier would cancel their calls in flight, which may still finish while
        the pod drains)."""
        current = set(self._pods.values())
        leavers = [c for c, sessions in self._sessions.items() if sessions == 0 and c not in current]
        for client in leavers:
            del self._sessions[client]
        await asyncio.gather(*(c.disconnect() for c in leavers))
