"""Progress of desktops (pull, create, start, waiting, ready, failed, stopped) for server-sent events.

Each desktop keeps a short history so that a subscriber who arrives late still sees how far it got.
Subscribers get bounded queues; one that does not keep up loses the oldest progress lines, never the
final state (which the endpoint also reads from the database).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import datetime as dt
import json
from collections.abc import Iterator

from desktop_gateway.db.models import utcnow

HISTORY = 50
QUEUE = 100


@dataclasses.dataclass(frozen=True, slots=True)
class DesktopEvent:
    desktop_id: str
    step: str
    message: str
    state: str | None = None
    at: dt.datetime = dataclasses.field(default_factory=utcnow)

    def sse(self) -> str:
        data = {"step": self.step, "message": self.message, "state": self.state, "at": self.at.isoformat()}
        return f"event: {self.step}\ndata: {json.dumps(data)}\n\n"


class DesktopEvents:
    def __init__(self) -> None:
        self._history: dict[str, collections.deque[DesktopEvent]] = {}
        self._subscribers: dict[str, set[asyncio.Queue[DesktopEvent]]] = {}
        self._everything: set[asyncio.Queue[DesktopEvent]] = set()

    def publish(self, desktop_id: str, step: str, message: str, state: str | None = None) -> None:
        event = DesktopEvent(desktop_id, step, message, state)
        self._history.setdefault(desktop_id, collections.deque(maxlen=HISTORY)).append(event)
        for queue in (*self._subscribers.get(desktop_id, ()), *self._everything):
            if queue.full():
                queue.get_nowait()
            queue.put_nowait(event)

    def history(self, desktop_id: str) -> list[DesktopEvent]:
        return list(self._history.get(desktop_id, ()))

    def forget(self, desktop_id: str) -> None:
        self._history.pop(desktop_id, None)

    @contextlib.contextmanager
    def subscribe(self, desktop_id: str) -> Iterator[asyncio.Queue[DesktopEvent]]:
        queue: asyncio.Queue[DesktopEvent] = asyncio.Queue(maxsize=QUEUE)
        self._subscribers.setdefault(desktop_id, set()).add(queue)
        try:
            yield queue
        finally:
            subscribers = self._subscribers.get(desktop_id)
            if subscribers is not None:
                subscribers.discard(queue)
                if not subscribers:
                    del self._subscribers[desktop_id]

    @contextlib.contextmanager
    def subscribe_all(self) -> Iterator[asyncio.Queue[DesktopEvent]]:
        """Every desktop's events (a person's dashboard filters its own; new desktops included)."""
        queue: asyncio.Queue[DesktopEvent] = asyncio.Queue(maxsize=QUEUE)
        self._everything.add(queue)
        try:
            yield queue
        finally:
            self._everything.discard(queue)
