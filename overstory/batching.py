"""What one process asks of one actor in one event-loop turn, sent as one call.

A burst of requests arriving together (streams starting, requests counted against a
rate) would be as many Ray calls; :class:`TurnBatch` gathers the questions asked during
one turn of the event loop and sends them in one call, each asker awaiting its own
answer. A failed send fails every asker of that batch with the same exception.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

__all__ = ["TurnBatch"]

Q = TypeVar("Q")
A = TypeVar("A")


class TurnBatch(Generic[Q, A]):
    """``await batch.ask(q)``: ``q`` goes out with the others asked in this loop turn,
    through ``send`` (questions in, answers out, in order). A question whose asker was
    cancelled before the batch left is not sent."""

    def __init__(self, send: Callable[[list[Q]], Awaitable[Sequence[A]]]) -> None:
        self._send = send
        self._asked: list[tuple[Q, asyncio.Future[A]]] = []
        self._sending: set[asyncio.Task[None]] = set()  # held: the loop keeps weak refs

    async def ask(self, question: Q) -> A:
        loop = asyncio.get_running_loop()
        if not self._asked:
            loop.call_soon(self._start)
        answer: asyncio.Future[A] = loop.create_future()
        self._asked.append((question, answer))
        return await answer

    def _start(self) -> None:
        task = asyncio.get_running_loop().create_task(self._go())
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def _go(self) -> None:
        asked, self._asked = self._asked, []
        asked = [a for a in asked if not a[1].done()]
        if not asked:
            return
        try:
            answers = await self._send([q for q, _ in asked])
            if len(answers) != len(asked):
                raise RuntimeError(f"{len(asked)} questions sent, {len(answers)} answers")
        except BaseException as exc:  # every asker waiting here gets an answer
            for _, answer in asked:
                if not answer.done():
                    answer.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        for (_, answer), result in zip(asked, answers, strict=True):
            if not answer.done():
                answer.set_result(result)
