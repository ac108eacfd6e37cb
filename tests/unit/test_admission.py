"""Admission control: a bounded number of running fusions, a bounded and time-limited wait, refusals."""

from __future__ import annotations

import asyncio

import pytest

from coolfusion.orchestrator.admission import Admission, AdmissionLimits, Overloaded


def test_slots_pass_to_waiters_in_arrival_order_and_excess_is_refused():
    refused: list[str] = []
    admission = Admission(AdmissionLimits(max_running=1, max_waiting=2, max_wait_s=5), on_refused=refused.append)
    order: list[str] = []

    async def fusion(name: str, hold: asyncio.Event) -> None:
        async with admission.slot(wait_s=5):
            order.append(name)
            await hold.wait()

    async def run() -> None:
        holds = {name: asyncio.Event() for name in "abc"}
        tasks = {name: asyncio.create_task(fusion(name, holds[name])) for name in "abc"}
        await asyncio.sleep(0.01)
        assert (admission.running, admission.waiting) == (1, 2)
        with pytest.raises(Overloaded, match="1 fusions running and 2 waiting"):
            async with admission.slot(wait_s=5):
                pass
        for name in "abc":
            holds[name].set()
            await tasks[name]
        assert (admission.running, admission.waiting) == (0, 0)

    asyncio.run(run())
    assert order == ["a", "b", "c"]
    assert refused == ["queue_full"]


def test_a_wait_is_bounded_by_the_request_and_the_limit():
    refused: list[str] = []
    admission = Admission(AdmissionLimits(max_running=1, max_waiting=4, max_wait_s=0.2), on_refused=refused.append)

    async def run() -> float:
        release = asyncio.Event()

        async def holder() -> None:
            async with admission.slot(wait_s=5):
                await release.wait()

        task = asyncio.create_task(holder())
        await asyncio.sleep(0)
        started = asyncio.get_running_loop().time()
        with pytest.raises(Overloaded, match="no fusion slot freed within 0.2 s"):
            async with admission.slot(wait_s=30):  # the limit (0.2 s) is shorter than the request's time
                pass
        waited = asyncio.get_running_loop().time() - started
        assert admission.waiting == 0
        release.set()
        await task
        return waited

    assert 0.15 < asyncio.run(run()) < 2
    assert refused == ["wait_timeout"]
    assert admission.running == 0


def test_a_cancelled_waiter_gives_its_place_back():
    admission = Admission(AdmissionLimits(max_running=1, max_waiting=4, max_wait_s=5))

    async def run() -> None:
        release = asyncio.Event()

        async def holder() -> None:
            async with admission.slot(wait_s=5):
                await release.wait()

        first = asyncio.create_task(holder())
        await asyncio.sleep(0)
        waiter = asyncio.create_task(holder())
        await asyncio.sleep(0.01)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert admission.waiting == 0
        release.set()
        await first
        assert admission.running == 0

    asyncio.run(run())
