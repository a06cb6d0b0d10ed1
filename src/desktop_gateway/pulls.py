"""Image pulls an admin asks for: one pull per image at a time in this process (asking again joins the
running one), its progress for whoever watches, and its failure in a word the page can say.

The pull itself is the runtime's :meth:`~desktop_gateway.runtime.ContainerRuntime.ensure_image`, the same
a desktop's start uses (an image already present is not pulled again). No Starlette here: the admin page
shows what this module reports.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import logging
from collections.abc import AsyncIterator

from desktop_gateway.runtime import ContainerRuntime, EngineUnreachable, RuntimeFailure
from desktop_gateway.runtime.pullprogress import PullProgress

log = logging.getLogger("desktop_gateway.pulls")


class PullState(enum.StrEnum):
    PULLING = "pulling"
    DONE = "done"
    FAILED = "failed"


class PullFailure(enum.StrEnum):
    """Why a pull failed, as the page tells it."""

    NOT_FOUND = "not_found"  # the registry has no such image, or will not give it to us
    UNREACHABLE = "unreachable"  # the registry cannot be reached from the Docker host
    ENGINE_AWAY = "engine_away"  # the Docker engine does not answer
    OTHER = "other"


# Words in Docker's (English) error messages, by what they mean. Docker has no codes for these.
_NOT_FOUND = ("not found", "manifest unknown", "pull access denied", "does not exist", "unauthorized")
_UNREACHABLE = (
    "dial tcp",
    "no such host",
    "connection refused",
    "timeout",
    "timed out",
    "network is unreachable",
    "server misbehaving",
    "tls:",
    "x509",
)


def failure_of(exc: RuntimeFailure) -> PullFailure:
    """What a failed pull's exception means to an admin."""
    if isinstance(exc, EngineUnreachable):
        return PullFailure.ENGINE_AWAY
    text = str(exc).lower()
    if any(word in text for word in _UNREACHABLE):
        return PullFailure.UNREACHABLE
    if any(word in text for word in _NOT_FOUND):
        return PullFailure.NOT_FOUND
    return PullFailure.OTHER


@dataclasses.dataclass(frozen=True, slots=True)
class PullStatus:
    image: str
    state: PullState
    progress: PullProgress
    failure: PullFailure | None = None
    detail: str | None = None  # the runtime's own (English) words, for the log


class Pull:
    """One pull of one image; :meth:`watch` follows it to its end."""

    def __init__(self, image: str) -> None:
        self.status = PullStatus(image, PullState.PULLING, PullProgress())
        self._changed = asyncio.Event()

    def update(self, status: PullStatus) -> None:
        self.status = status
        self._changed.set()
        self._changed = asyncio.Event()

    async def watch(self) -> AsyncIterator[PullStatus]:
        """The status now and at each change (quick changes may be seen as one), until it has ended."""
        while True:
            changed, status = self._changed, self.status
            yield status
            if status.state is not PullState.PULLING:
                return
            await changed.wait()


class ImagePulls:
    """This process's pulls, by image: the running one, else the last (kept for the page to show how it
    ended; one per configured image at most)."""

    def __init__(self) -> None:
        self._running: dict[str, Pull] = {}
        self._last: dict[str, Pull] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def latest(self, image: str) -> Pull | None:
        """The running pull of ``image``, else the last one this process made (None if none)."""
        return self._running.get(image) or self._last.get(image)

    def start(self, runtime: ContainerRuntime, image: str) -> tuple[Pull, bool]:
        """Pull ``image`` in the background, or join the pull already running; ``True`` if new."""
        running = self._running.get(image)
        if running is not None:
            return running, False
        pull = Pull(image)
        self._running[image] = self._last[image] = pull
        task = asyncio.create_task(self._pull(runtime, pull), name=f"pull {image}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return pull, True

    async def _pull(self, runtime: ContainerRuntime, pull: Pull) -> None:
        image = pull.status.image

        def measured(progress: PullProgress) -> None:
            pull.update(dataclasses.replace(pull.status, progress=progress))

        try:
            await runtime.ensure_image(image, lambda line: log.debug("pull %s: %s", image, line), measured)
        except RuntimeFailure as exc:
            log.warning("pull of %s failed: %s", image, exc)
            pull.update(
                dataclasses.replace(
                    pull.status, state=PullState.FAILED, failure=failure_of(exc), detail=str(exc)
                )
            )
        except Exception as exc:
            log.exception("pull of %s failed", image)
            pull.update(
                dataclasses.replace(
                    pull.status, state=PullState.FAILED, failure=PullFailure.OTHER, detail=type(exc).__name__
                )
            )
        else:
            log.info("pulled %s", image)
            done = dataclasses.replace(
                pull.status.progress, percent=100, layers_done=pull.status.progress.layers
            )
            pull.update(dataclasses.replace(pull.status, state=PullState.DONE, progress=done))
        finally:
            self._running.pop(image, None)

    async def close(self) -> None:
        """Cancel the pulls still running (the gateway is shutting down)."""
        for task in list(self._tasks):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
