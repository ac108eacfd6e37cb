"""Replica sets place sessions on the least-loaded pod, avoid failed pods, and follow DNS."""

from __future__ import annotations

import asyncio
import socket

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from coolfusion.orchestrator.registry import RegistryError, WorkerPool, parse_registry
from coolfusion.orchestrator.replicas import ReplicaSet, resolve_dns, split_host_port
from coolfusion.orchestrator.worker_client import WorkerUnavailable


class FakeClient:
    """Stands in for a WorkerClient: the replica set only needs its address and its channel's close."""

    def __init__(self, address: str):
        self.name = "bpe"
        self.address = address
        self.disconnected = False

    async def disconnect(self) -> None:
        self.disconnected = True


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Pods:
    """A resolver whose answer the test changes, and the clients the set made."""

    def __init__(self, *addresses: str):
        self.addresses = list(addresses)
        self.clients: dict[str, FakeClient] = {}
        self.lookups = 0

    async def resolve(self) -> list[str]:
        self.lookups += 1
        if isinstance(self.addresses, Exception):
            raise self.addresses
        return list(self.addresses)

    def connect(self, address: str) -> FakeClient:
        self.clients[address] = FakeClient(address)
        return self.clients[address]


def replica_set(pods: Pods, clock: Clock | None = None) -> ReplicaSet:
    return ReplicaSet("bpe", pods.resolve, pods.connect, refresh_s=10, cooldown_s=30, clock=clock or Clock())


async def addresses(replicas: ReplicaSet, n: int, exclude=()) -> list[str | None]:
    placed = [await replicas.acquire(exclude) for _ in range(n)]
    return [c.address if c else None for c in placed]


def test_sessions_go_to_the_least_loaded_pod_ties_to_the_first_address():
    async def run():
        pods = Pods("10.0.0.2:7", "10.0.0.1:7", "10.0.0.3:7")
        replicas = replica_set(pods)
        assert await addresses(replicas, 4) == ["10.0.0.1:7", "10.0.0.2:7", "10.0.0.3:7", "10.0.0.1:7"]
        replicas.release(pods.clients["10.0.0.3:7"])
        assert await addresses(replicas, 2) == ["10.0.0.3:7", "10.0.0.2:7"]

    asyncio.run(run())


def test_a_failed_pod_gets_no_session_while_another_can_take_it_until_the_cooldown_passes():
    async def run():
        clock = Clock()
        pods = Pods("a:1", "b:1")
        replicas = replica_set(pods, clock)
        await replicas.pods()
        replicas.mark_failed(pods.clients["a:1"])
        assert await addresses(replicas, 3) == ["b:1", "b:1", "b:1"]
        clock.now += 31
        assert await addresses(replicas, 1) == ["a:1"]

    asyncio.run(run())


def test_when_every_pod_failed_the_least_loaded_is_still_tried_but_never_one_already_tried():
    async def run():
        pods = Pods("a:1", "b:1")
        replicas = replica_set(pods)
        await replicas.pods()
        for client in pods.clients.values():
            replicas.mark_failed(client)
        first = await replicas.acquire()
        assert first.address == "a:1"
        assert (await replicas.acquire(exclude=[first])).address == "b:1"
        assert await replicas.acquire(exclude=list(pods.clients.values())) is None

    asyncio.run(run())


def test_a_failed_pod_is_redialled_on_a_new_channel_for_its_next_session_once_per_failure():
    # gRPC fails calls at once while a failed channel is in reconnect backoff (up to minutes): a
    # worker restarted at the same address must get a new channel, or it stays unused that long.
    async def run():
        pods = Pods("a:1")
        replicas = replica_set(pods)
        old = await replicas.acquire()
        replicas.mark_failed(old)
        assert await replicas.acquire(exclude=[old]) is None, "the request that saw it fail tried it"
        new = await replicas.acquire()
        assert new is not old and new.address == "a:1", "the only replica must still be tried, afresh"
        assert await replicas.acquire(exclude=[old]) is None, "a request tries each pod once, any channel"
        assert not old.disconnected, "closing the channel would cancel the session's calls in flight"
        replicas.mark_failed(old)  # a late failure on the replaced channel
        assert await replicas.acquire() is new
        replicas.release(old)
        replicas.mark_failed(new)
        newer = await replicas.acquire()
        assert newer not in (old, new) and old.disconnected and not new.disconnected

    asyncio.run(run())


async def serving_health(port: int) -> tuple[grpc.aio.Server, int]:
    """A gRPC server that answers health checks only: a worker as the replica set sees it."""
    server = grpc.aio.server()
    servicer = health.aio.HealthServicer()
    await servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    return server, port


def test_a_worker_restarted_at_its_address_is_reached_at_once_not_after_grpc_reconnect_backoff():
    async def run():
        server, port = await serving_health(0)
        pool = WorkerPool(parse_registry({"workers": [{"name": "bpe", "address": f"127.0.0.1:{port}"}]}))
        (replicas,) = pool.select([])
        try:
            before = await replicas.acquire()
            assert await before.is_serving(2)
            await server.stop(0)
            with pytest.raises(WorkerUnavailable):
                await before.is_serving(2)  # its channel now waits out a backoff before dialling again
            replicas.mark_failed(before)  # `before` keeps its session: its channel stays open meanwhile
            server, _ = await serving_health(port)
            assert await (await replicas.acquire()).is_serving(2)
        finally:
            await pool.close()
            await server.stop(0)

    asyncio.run(run())


def test_refresh_adds_new_pods_and_closes_those_that_left_once_their_sessions_end():
    async def run():
        clock = Clock()
        pods = Pods("a:1", "b:1")
        replicas = replica_set(pods, clock)
        held = await replicas.acquire()  # a:1 holds a session
        pods.addresses = ["b:1", "c:1"]
        clock.now += 5
        await replicas.pods()
        assert pods.lookups == 1, "re-resolved before refresh_s passed"
        clock.now += 5
        assert [c.address for c in await replicas.pods()] == ["b:1", "c:1"]
        assert not held.disconnected, "closing the channel would cancel the session's calls in flight"
        assert await addresses(replicas, 2) == ["b:1", "c:1"]
        replicas.release(held)
        await replicas.refresh()
        assert held.disconnected and not pods.clients["b:1"].disconnected

    asyncio.run(run())


def test_a_failed_lookup_keeps_the_known_pods_and_says_why_when_there_are_none():
    async def run():
        pods = Pods("a:1")
        replicas = replica_set(pods)
        await replicas.pods()
        pods.addresses = socket.gaierror(-2, "Name or service not known")
        await replicas.refresh()
        assert [c.address for c in await replicas.pods()] == ["a:1"]
        empty = replica_set(pods)
        assert await empty.acquire() is None
        assert "Name or service not known" in empty.problem

    asyncio.run(run())


def test_dns_resolution_strips_the_scheme_and_lists_each_record_once(monkeypatch):
    asked = []

    def getaddrinfo(host, port, *args, **kwargs):
        asked.append((host, port))
        v4 = (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.1.0.5", port))
        v6 = (socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("fd00::7", port, 0, 0))
        other = (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.1.0.4", port))
        return [v4, v6, other, v4]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    found = asyncio.run(resolve_dns("dns:///bpe-pods.fusion.svc.cluster.local:50051"))
    assert asked == [("bpe-pods.fusion.svc.cluster.local", 50051)]
    assert found == ["10.1.0.4:50051", "10.1.0.5:50051", "[fd00::7]:50051"]


@pytest.mark.parametrize(
    ("address", "expected"),
    [("w:1", ("w", 1)), ("dns:///w.ns:50051", ("w.ns", 50051)), ("[fd00::7]:9", ("fd00::7", 9))],
)
def test_host_and_port_are_split(address, expected):
    assert split_host_port(address) == expected


@pytest.mark.parametrize("address", ["w", "w:", ":1", "w:port", "w:70000"])
def test_an_address_without_a_valid_port_is_refused(address):
    with pytest.raises(ValueError, match="is not host:port"):
        split_host_port(address)


def test_registry_reads_replica_modes_and_defaults_to_one_target():
    single, listed, dns = parse_registry(
        {
            "workers": [
                {"name": "one", "address": "w:1"},
                {"name": "two", "address": "a:1, b:2", "replicas": "static"},
                {"name": "three", "address": "dns:///w.ns:1", "replicas": "dns", "refresh_s": 2},
            ]
        }
    )
    assert (single.replicas, single.refresh_s) == (None, 10.0)
    assert (listed.replicas, dns.replicas, dns.refresh_s) == ("static", "dns", 2.0)


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ({"replicas": "round-robin"}, "replicas is 'round-robin'; it must be 'dns'"),
        ({"replicas": "static", "address": "a:1,b"}, "'b' is not host:port"),
        ({"replicas": "static", "address": "a:1,,b:2"}, "'' is not host:port"),
        ({"replicas": "dns", "address": "svc"}, "'svc' is not host:port"),
        ({"refresh_s": 0}, "refresh_s is 0; it must be a positive number"),
        ({"refresh_s": "10s"}, "refresh_s is '10s'"),
    ],
)
def test_registry_refuses_bad_replica_settings_saying_what_is_allowed(item, message):
    with pytest.raises(RegistryError, match=message.replace("(", r"\(")):
        parse_registry({"workers": [{"name": "w", "address": "w:1", **item}]})


def test_pool_gives_each_static_replica_its_own_client_named_after_the_worker():
    async def run():
        entry = {"name": "bpe", "address": "127.0.0.1:1,127.0.0.1:2", "replicas": "static"}
        pool = WorkerPool(parse_registry({"workers": [entry]}))
        (replicas,) = pool.select(["bpe"])
        clients = await replicas.pods()
        assert [(c.name, c.address) for c in clients] == [("bpe", "127.0.0.1:1"), ("bpe", "127.0.0.1:2")]
        await pool.close()

    asyncio.run(run())
