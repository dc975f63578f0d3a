"""How one turn of the event loop is shared between open streams and new requests.

A turn runs every callback that is ready. Left alone, that is unfair twice over: under full load
the reads of the open streams (each may hold many frames) make every turn long, and a new
request, which needs a handful of turns (read, prepare, connect, first frame), waits that many
long turns; and a burst of new requests advances in lock-step, each of its stages taken by all
of them in the same turn, so none of them sees a first token before all of them are prepared.
``FairShare`` bounds the first (``spend``: the streams of a turn share ``TURN_SLICE``) and
orders the second (``admit``: generation requests start ``ADMIT_PER_TURN`` a turn, in arrival
order, so the first of a burst streams while the last are still waiting, not all at the end).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import ClassVar, Final

__all__ = ["ADMIT_PER_TURN", "TURN_SLICE", "FairShare"]

TURN_SLICE: Final = 0.004
"""Seconds of relaying the open streams may take in one turn of the event loop."""
ADMIT_PER_TURN: Final = 2
"""New generation requests that start in one turn of the event loop; the others wait their
turn, in arrival order (their bytes held, their socket not read)."""


_ALL: Final = 1 << 30


class FairShare:
    """One per event loop (``of``).

    ``spend``: a stream read once the turn's slice is spent stops reading until the next turn
    (its data waits in the socket), which starts with the callbacks that were waiting, new
    requests' included. With no new request, the streams still get all the time there is, a
    slice at a time.

    ``admit``: a new request starts now, or its ``start`` is called in a later turn, first come
    first served. A burst of N requests then costs the k-th about k requests' work before its
    first token instead of N (the last ones wait as long as before)."""

    _shares: ClassVar[dict[asyncio.AbstractEventLoop, FairShare]] = {}

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._spent = 0.0
        self._admitted = 0
        self._limit = ADMIT_PER_TURN
        self._turn_open = False
        self._waiting: deque[tuple[asyncio.Transport, float]] = deque()  # paused, their read's cost
        self._queue: deque[Callable[[], None]] = deque()

    @classmethod
    def of(cls, loop: asyncio.AbstractEventLoop) -> FairShare:
        share = cls._shares.get(loop)
        if share is None:
            share = cls._shares[loop] = cls(loop)
        return share

    def spend(self, seconds: float, transport: asyncio.Transport, *, first: bool = False) -> None:
        """A stream read took ``seconds``; past the turn's slice its transport waits, unless
        the read was before the stream's ``first`` frame (a new request's, never held back)."""
        if not self._turn_open:
            self._open_turn()
        self._spent += seconds
        if self._spent <= TURN_SLICE or first or transport.is_closing():
            return
        transport.pause_reading()
        self._waiting.append((transport, seconds))

    def admit(self, start: Callable[[], None]) -> bool:
        """True: the new request starts now. False: ``start()`` will be called when its turn
        comes (the caller holds what it read until then)."""
        self._open_turn()
        if not self._queue and self._admitted < self._limit:
            self._admitted += 1
            return True
        self._queue.append(start)
        return False

    def _open_turn(self) -> None:
        if not self._turn_open:  # the first event of this turn: the next turn resets the books
            self._turn_open = True
            self._loop.call_soon(self._next_turn)

    def _next_turn(self) -> None:
        # Streams that used their whole slice last turn will take every turn's slice: new
        # requests then all start at once, the order bought nothing but a longer wait.
        self._limit = ADMIT_PER_TURN if self._spent <= TURN_SLICE else _ALL
        self._spent, self._admitted, self._turn_open = 0.0, 0, False
        # The streams that waited resume in arrival order, as many as their last reads fit in
        # a slice (at least one): resumed all at once they would all be read again in the
        # next turn, whatever its slice, and a turn would last as long as every stream's read.
        waiting, budget = self._waiting, TURN_SLICE
        while waiting and budget > 0:
            transport, cost = waiting.popleft()
            if not transport.is_closing():
                transport.resume_reading()
                budget -= cost
        if self._queue or waiting:
            self._open_turn()  # this turn's books, and the next turn for those still waiting
            while self._queue and self._admitted < self._limit:
                self._admitted += 1
                self._queue.popleft()()
        else:  # a quiet turn: forget this loop until its next event
            self._shares.pop(self._loop, None)
