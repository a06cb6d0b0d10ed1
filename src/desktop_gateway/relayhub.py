"""The relays running in this process, by desktop, so that stopping a desktop can end its connections."""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import time
from collections.abc import Iterator

from desktop_gateway.closepolicy import Close


@dataclasses.dataclass(eq=False, slots=True, weakref_slot=True)
class RelayHandle:
    """One browser relayed to one desktop. The relay watches :attr:`stopped` to end itself."""

    desktop_id: str
    desktop_name: str
    username: str
    session_id: str
    watching: bool = False  # a view-only watcher's relay: not the owner's, never input
    started: float = dataclasses.field(default_factory=time.monotonic)
    last_input: float = dataclasses.field(default_factory=time.monotonic)
    bytes_up: int = 0
    bytes_down: int = 0
    stopped: asyncio.Future[Close] = dataclasses.field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )

    def stop(self, close: Close) -> None:
        if not self.stopped.done():
            self.stopped.set_result(close)


class RelayHub:
    def __init__(self) -> None:
        self._by_desktop: dict[str, set[RelayHandle]] = {}
        self._per_user: collections.Counter[str] = collections.Counter()
        self._empty = asyncio.Event()
        self._empty.set()

    def add(self, handle: RelayHandle, limit_per_user: int = 0) -> bool:
        """Register a relay (before it dials, so that it can be stopped from then on); ``False``, and
        nothing registered, when its user has ``limit_per_user`` relays already (0: no limit)."""
        if limit_per_user and self._per_user[handle.username] >= limit_per_user:
            return False
        self._by_desktop.setdefault(handle.desktop_id, set()).add(handle)
        self._per_user[handle.username] += 1
        self._empty.clear()
        return True

    def discard(self, handle: RelayHandle) -> None:
        handles = self._by_desktop.get(handle.desktop_id)
        if handles is not None and handle in handles:
            handles.discard(handle)
            self._per_user[handle.username] -= 1
            if not self._per_user[handle.username]:
                del self._per_user[handle.username]
            if not handles:
                del self._by_desktop[handle.desktop_id]
                if not self._by_desktop:
                    self._empty.set()

    async def wait_empty(self) -> None:
        await self._empty.wait()

    def __iter__(self) -> Iterator[RelayHandle]:
        for handles in list(self._by_desktop.values()):
            yield from list(handles)

    def __len__(self) -> int:
        return sum(len(h) for h in self._by_desktop.values())

    def for_desktop(self, desktop_id: str) -> list[RelayHandle]:
        return list(self._by_desktop.get(desktop_id, ()))

    def stop_desktop(self, desktop_id: str, close: Close) -> int:
        """End every relay to ``desktop_id`` with ``close``; return how many there were."""
        handles = self.for_desktop(desktop_id)
        for handle in handles:
            handle.stop(close)
        return len(handles)

    def stop_session(self, session_id: str, close: Close) -> int:
        """End every relay opened by one signed-in browser session (it signed out)."""
        handles = [h for h in self if h.session_id == session_id]
        for handle in handles:
            handle.stop(close)
        return len(handles)

    def stop_user(self, username: str, close: Close) -> int:
        """End every relay of one user (blocked)."""
        handles = [h for h in self if h.username == username]
        for handle in handles:
            handle.stop(close)
        return len(handles)

    def stop_all(self, close: Close) -> int:
        handles = list(self)
        for handle in handles:
            handle.stop(close)
        return len(handles)
