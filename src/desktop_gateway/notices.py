"""Notices between gateways on one database: a desktop stopped, a session ended, a person was blocked.

The gateway that makes such a change closes its own relays at once; a notice tells the others, so that
a relay held by any gateway closes within moments of a stop or a sign-out at any other.

On PostgreSQL a notice is a ``NOTIFY`` sent in the transaction that makes the change (:func:`announce`):
PostgreSQL delivers it at commit, and never for a change rolled back. Every gateway process ``LISTEN``s
on one connection of its own (:class:`Listener`). A notice only ever closes relays, and the rows stay
the truth: notices missed while that connection was down are made up for by a check of the rows as soon
as it is back (the ``reconnected`` callback).

SQLite has no such channel. Its gateways are worker processes on one machine, which notice each other's
changes by checking the rows of their relays every second (see :mod:`desktop_gateway.sessionwatch`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import hashlib
import hmac
import json
import logging
import os
import secrets
import socket
from collections.abc import Callable
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from desktop_gateway import closepolicy, peers
from desktop_gateway.relayhub import RelayHub

log = logging.getLogger("desktop_gateway")

CHANNEL = "desktop_gateway"
HEALTH_INTERVAL = 15.0  # seconds between checks that the listening connection still answers
HEALTH_TIMEOUT = 5.0
RETRY_INTERVAL = 1.0  # seconds between attempts to listen again after the connection was lost


class Kind(enum.StrEnum):
    DESKTOP_STOPPED = "desktop-stopped"  # key: the desktop's id
    SESSION_ENDED = "session-ended"  # key: the browser session's id
    USER_BLOCKED = "user-blocked"  # key: the user's name
    HELLO = "hello"  # a gateway began listening; key: its secret key's fingerprint
    HERE = "here"  # a listening gateway's answer to a hello; key: the same


@dataclasses.dataclass(frozen=True, slots=True)
class Notice:
    kind: Kind
    key: str
    sender: str = ""

    def encode(self) -> str:
        return json.dumps({"kind": self.kind.value, "key": self.key, "from": self.sender})

    @classmethod
    def decode(cls, payload: str) -> Notice | None:
        """The notice in ``payload``; ``None`` for anything else on the channel."""
        try:
            data = json.loads(payload)
            return cls(Kind(data["kind"]), str(data["key"]), str(data.get("from", "")))
        except (ValueError, KeyError, TypeError):
            return None


async def announce(db: AsyncSession, kind: Kind, key: str) -> None:
    """Tell the other gateways, when ``db``'s transaction commits, that ``key`` ended (nothing on SQLite)."""
    if db.get_bind().dialect.name == "postgresql":
        await db.execute(select(func.pg_notify(CHANNEL, Notice(kind, key).encode())))


CLOSES = {
    Kind.DESKTOP_STOPPED: closepolicy.DESKTOP_STOPPED,
    Kind.SESSION_ENDED: closepolicy.SIGNED_OUT,
    Kind.USER_BLOCKED: closepolicy.BLOCKED,
}


def apply(hub: RelayHub, notice: Notice) -> int:
    """Close this process's relays that ``notice`` ends; return how many."""
    close = CLOSES.get(notice.kind)
    if close is None:
        return 0
    if notice.kind == Kind.DESKTOP_STOPPED:
        return hub.stop_desktop(notice.key, close)
    if notice.kind == Kind.SESSION_ENDED:
        return hub.stop_session(notice.key, close)
    return hub.stop_user(notice.key, close)


def key_fingerprint(secret_key: str) -> str:
    """What gateways compare to find out whether they share the secret key; tells nothing of the key."""
    return hmac.new(secret_key.encode(), b"desktop-gateway key check", hashlib.sha256).hexdigest()[:16]


class Listener:
    """One gateway process's ``LISTEN`` connection to PostgreSQL, connected again whenever it is lost.

    It also carries the process's presence (see :mod:`desktop_gateway.peers`), and greets the other
    gateways with a fingerprint of the secret key: gateways that do not share the key cannot share
    their people (a cookie signed by one is refused by the other), which both then log as an error.
    """

    def __init__(
        self,
        engine: AsyncEngine,
        hub: RelayHub,
        *,
        instance: str,
        secret_key: str,
        reconnected: Callable[[], None],
    ) -> None:
        self.engine = engine
        self.hub = hub
        self.instance = instance
        self.fingerprint = key_fingerprint(secret_key)
        self.reconnected = reconnected
        self.me = f"{socket.gethostname()} (pid {os.getpid()}, {secrets.token_hex(3)})"
        self.listening = asyncio.Event()
        self._told: set[str] = set()  # gateways already reported for another key
        self._replies: set[asyncio.Task[None]] = set()

    async def run(self) -> None:
        """Listen until cancelled."""
        down = False
        while True:
            try:
                await self._listen(again=down)
                cause = "the connection to the database was closed"
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                cause = str(exc) or type(exc).__name__
            if not down:
                log.warning(
                    "notices from other gateways are not received (%s); trying again every %d s, and "
                    "checking the relays' sessions and desktops meanwhile",
                    cause,
                    RETRY_INTERVAL,
                )
                down = True
            await asyncio.sleep(RETRY_INTERVAL)

    async def _listen(self, again: bool) -> None:
        async with self.engine.connect() as conn:
            try:
                driver = (await conn.get_raw_connection()).driver_connection
                assert driver is not None  # a connection just checked out of the pool
                lost = asyncio.Event()
                driver.add_termination_listener(lambda _connection: lost.set())
                await driver.add_listener(CHANNEL, self._received)
                await peers.hold_presence(driver, self.instance)
                hello = Notice(Kind.HELLO, self.fingerprint, self.me).encode()
                await driver.execute("SELECT pg_notify($1, $2)", CHANNEL, hello)
                self.listening.set()
                if again:
                    log.info("notices from other gateways are received again")
                self.reconnected()
                await self._until_lost(driver, lost)
            finally:
                self.listening.clear()
                with contextlib.suppress(Exception):
                    await conn.invalidate()  # never back into the pool: it listens and holds a lock

    async def _until_lost(self, driver: Any, lost: asyncio.Event) -> None:
        """Return when the connection ends; raise when it stops answering (a network that dropped it
        without a word)."""
        while not lost.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(lost.wait(), HEALTH_INTERVAL)
            if not lost.is_set():
                async with asyncio.timeout(HEALTH_TIMEOUT):
                    await driver.fetchval("SELECT 1")

    def _received(self, connection: object, pid: int, channel: str, payload: str) -> None:
        notice = Notice.decode(payload)
        if notice is None:
            return
        if notice.kind in (Kind.HELLO, Kind.HERE):
            self._greeted(notice)
        else:
            apply(self.hub, notice)  # each relay logs its own close

    def _greeted(self, notice: Notice) -> None:
        if notice.sender == self.me:
            return
        if notice.key != self.fingerprint and notice.sender not in self._told:
            self._told.add(notice.sender)
            log.error(
                "the gateway on %s uses another secret key than this one: people signed in through one "
                "are not signed in at the other, and launch links of one fail at the other; give every "
                "gateway on this database the same DESKTOP_GATEWAY_SECRET_KEY",
                notice.sender,
            )
        if notice.kind == Kind.HELLO:
            task = asyncio.create_task(self._answer(), name="notice answer")
            self._replies.add(task)
            task.add_done_callback(self._replies.discard)

    async def _answer(self) -> None:
        try:
            async with self.engine.connect() as conn:
                here = Notice(Kind.HERE, self.fingerprint, self.me).encode()
                await conn.execute(select(func.pg_notify(CHANNEL, here)))
                await conn.commit()
        except Exception as exc:  # only the key check misses it
            log.debug("could not answer another gateway's greeting: %s", exc)
