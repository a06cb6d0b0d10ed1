"""How far an image pull has got, from the engine's pull messages: layers and bytes, and one percentage
for a progress bar.

Docker reports a pull as a stream of messages, one layer at a time (``Pulling fs layer``, ``Downloading``
with ``progressDetail.current/total``, ``Download complete``, ``Extracting``, ``Pull complete``, or
``Already exists``). Layers announce themselves as the pull goes on, so the percentage is the mean of the
layers known so far: each counts four fifths for its download and one fifth for its extraction. Pure, so
recorded message sequences pin it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

DOWNLOAD_SHARE = 0.8  # of a layer's part of the bar; the rest is its extraction
DONE = ("Pull complete", "Already exists")


@dataclasses.dataclass(frozen=True, slots=True)
class PullProgress:
    """What a pull has done so far: layers (complete of known), bytes (downloaded of known sizes) and the
    bar's percentage (0 to 100)."""

    layers_done: int = 0
    layers: int = 0
    bytes_done: int = 0
    bytes_total: int = 0
    percent: int = 0


@dataclasses.dataclass(slots=True)
class _Layer:
    fraction: float = 0.0  # of the layer's part of the bar
    current: int = 0
    total: int = 0


class PullTally:
    """Feed it each pull message (:meth:`add`); :attr:`progress` is where the pull is."""

    def __init__(self) -> None:
        self._layers: dict[str, _Layer] = {}

    def add(self, message: Mapping[str, Any]) -> PullProgress:
        status, layer_id = str(message.get("status", "")), message.get("id")
        # Messages without a layer (``Pulling from ...``, ``Digest: ...``) say nothing about progress.
        if isinstance(layer_id, str) and layer_id and not status.startswith(("Pulling from", "Digest")):
            layer = self._layers.setdefault(layer_id, _Layer())
            detail = message.get("progressDetail") or {}
            current, total = detail.get("current"), detail.get("total")
            share = None
            if isinstance(current, int) and isinstance(total, int) and total > 0:
                share = min(current / total, 1.0)
                if status == "Downloading":
                    layer.current, layer.total = min(current, total), total
            if status == "Downloading":
                if share is not None:
                    layer.fraction = max(layer.fraction, DOWNLOAD_SHARE * share)
            elif status in ("Download complete", "Verifying Checksum"):
                layer.current = layer.total
                layer.fraction = max(layer.fraction, DOWNLOAD_SHARE)
            elif status == "Extracting":
                layer.current = layer.total
                extracted = share if share is not None else 0.0
                layer.fraction = max(layer.fraction, DOWNLOAD_SHARE + (1 - DOWNLOAD_SHARE) * extracted)
            elif status in DONE:
                layer.current = layer.total
                layer.fraction = 1.0
        return self.progress

    @property
    def progress(self) -> PullProgress:
        layers = self._layers.values()
        mean = sum(layer.fraction for layer in layers) / len(layers) if layers else 0.0
        return PullProgress(
            layers_done=sum(1 for layer in layers if layer.fraction >= 1.0),
            layers=len(layers),
            bytes_done=sum(layer.current for layer in layers),
            bytes_total=sum(layer.total for layer in layers),
            percent=int(mean * 100),
        )
