"""One gateway in front of two orchestrator pods behind a headless Service spreads its calls over
both: the gateway resolves the Service's name itself (a DNS server on loopback stands in for the
cluster's, answering with one address per pod) and sends each call to the next pod."""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from coolfusion.cli.cluster import gateway_argv, launch, stop_processes, wait_ready

from in_process import address, sample, scrape, start_local_orchestrator, start_tiny_worker

SERVICE = "coolfusion-orchestrator-pods.coolfusion.svc.cluster.local"
PODS = ("127.0.0.1", "127.0.0.2")  # two loopback addresses, one port: two pods of one Service
REQUESTS = 100
_A, _IN = 1, 1  # DNS record type A (an IPv4 address), class IN


class LoopbackDns:
    """A DNS server on 127.0.0.1 that answers A queries for one name with fixed addresses, and
    every other query with no records, as a cluster's DNS answers for a headless Service."""

    def __init__(self, name: str, addresses: tuple[str, ...]):
        self._name, self._addresses = name, addresses
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._socket.bind(("127.0.0.1", 0))
        self.port = self._socket.getsockname()[1]
        self.queries: list[tuple[str, int]] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                query, client = self._socket.recvfrom(512)
            except OSError:  # closed
                return
            self._socket.sendto(self._answer(query), client)

    def _answer(self, query: bytes) -> bytes:
        # Header (12 bytes), then the question: the name as length-prefixed labels, type, class.
        ident, end, labels = query[:2], 12, []
        while query[end]:
            labels.append(query[end + 1 : end + 1 + query[end]].decode())
            end += 1 + query[end]
        kind = struct.unpack(">H", query[end + 1 : end + 3])[0]
        question = query[12 : end + 5]
        self.queries.append((".".join(labels), kind))
        found = kind == _A and ".".join(labels) == self._name
        records = [
            b"\xc0\x0c" + struct.pack(">HHIH", _A, _IN, 5, 4) + socket.inet_aton(ip)  # name: the question's
            for ip in (self._addresses if found else ())
        ]
        header = ident + struct.pack(">HHHHH", 0x8180, 1, len(records), 0, 0)  # a response, no error
        return header + question + b"".join(records)

    def close(self) -> None:
        self._socket.close()


@pytest.fixture
def dns() -> Iterator[LoopbackDns]:
    server = LoopbackDns(SERVICE, PODS)
    try:
        yield server
    finally:
        server.close()


def completions(base_url: str, count: int) -> list[str]:
    http = openai.DefaultHttpxClient(trust_env=False)
    with openai.OpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=120, http_client=http) as client:

        def one(i: int) -> str:
            return client.completions.create(model="coolfusion", prompt=f"Item {i}:", max_tokens=2).id

        with ThreadPoolExecutor(4) as pool:
            return list(pool.map(one, range(count)))


def test_one_gateway_spreads_calls_over_every_orchestrator_pod(tiny_model_dirs, dns):
    async def scenario() -> tuple[list[str], list[float]]:
        worker = await start_tiny_worker(tiny_model_dirs["char"], "char")
        first = await start_local_orchestrator({"char": address(worker)}, host=PODS[0])
        second = await start_local_orchestrator({"char": address(worker)}, host=PODS[1], port=first.port)
        pods = (first, second)
        gateway = None
        try:
            target = f"dns://127.0.0.1:{dns.port}/{SERVICE}:{first.port}"  # as dns:///name:port, with our DNS
            gateway = wait_ready(launch("gateway", gateway_argv(target)), 60)
            ids = await asyncio.to_thread(completions, f"http://{gateway.address}/v1", REQUESTS)
            served = [
                sample(scrape(pod.metrics_port, host), "coolfusion_grpc_server_handled_total",
                       grpc_service="coolfusion.v1.OrchestratorService", grpc_method="Fuse", grpc_code="OK") or 0.0
                for pod, host in zip(pods, PODS)
            ]  # fmt: skip
            return ids, served
        finally:
            if gateway is not None:
                stop_processes([gateway])
            for running in (*pods, worker):
                await running.stop(0)

    ids, served = asyncio.run(scenario())
    assert len(set(ids)) == REQUESTS  # every request answered, each its own fusion
    assert (SERVICE, 1) in dns.queries  # the gateway resolved the Service itself
    assert sum(served) == REQUESTS
    # Round robin alternates between the pods it is connected to. Both connect over loopback in
    # milliseconds, while the first answers (a fusion, tens of milliseconds at least) are on their
    # way, so only the first few calls can miss the second pod; a quarter each leaves room for that.
    assert min(served) >= REQUESTS / 4, served
