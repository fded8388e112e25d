"""How the LM replica groups a request's events into the items it sends across Ray."""

from __future__ import annotations

import asyncio

from mora_runtime.engine.types import TokenEvent
from serving.cluster.deployments import event_batches


def event(token: int, reason: str | None = None) -> TokenEvent:
    return TokenEvent("r", token, None, (), reason, 0)


async def collect(stream: bool, arrivals: list[list[TokenEvent]]) -> list[list[int]]:
    """Feed `arrivals` (what the engine emits between two reads) and return the batches."""
    queue: asyncio.Queue[TokenEvent] = asyncio.Queue()
    batches: list[list[int]] = []

    async def engine() -> None:
        for group in arrivals:
            for e in group:
                queue.put_nowait(e)
            await asyncio.sleep(0.01)  # the reader runs in between

    producer = asyncio.ensure_future(engine())
    async for batch in event_batches(queue, stream=stream):
        batches.append([e.token_id for e in batch])
    await producer
    return batches


def test_streaming_sends_the_first_event_alone_then_whatever_is_ready():
    arrivals = [[event(1), event(2)], [event(3)], [event(4), event(5, "length")]]
    assert asyncio.run(collect(True, arrivals)) == [[1], [2], [3], [4, 5]]


def test_non_streaming_sends_the_first_event_then_the_rest_at_once():
    arrivals = [[event(1)], [event(2)], [event(3)], [event(4, "stop")]]
    assert asyncio.run(collect(False, arrivals)) == [[1], [2, 3, 4]]


def test_a_final_first_event_ends_the_batches():
    assert asyncio.run(collect(False, [[event(9, "stop")]])) == [[9]]
    assert asyncio.run(collect(True, [[event(9, "stop")]])) == [[9]]
