"""Desktop types, read from the TOML file named by ``DESKTOP_GATEWAY_DESKTOP_TYPES``.

One table per type, ``[desktop_types.<name>]``, with a ``title`` and either an ``image`` (a container the
gateway runs) or an ``endpoint`` (a KasmVNC desktop that already runs elsewhere, e.g. a lab machine).
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
from pathlib import Path
from types import MappingProxyType
from typing import Any
from urllib.parse import urlsplit

TYPE_NAME = re.compile(r"^[a-z0-9]+(?:-[a-z0-9]+)*$")
MAX_TYPE_NAME = 40
_IMAGE_KEYS = {"memory", "cpus", "shm_size", "env", "mounts"}


class DesktopTypesError(Exception):
    """The desktop types file is unusable; the message names the file, the type and the key."""


@dataclasses.dataclass(frozen=True, slots=True)
class DesktopType:
    name: str
    title: str
    image: str | None = None
    endpoint: str | None = None
    username: str = "kasm_user"
    password: str | None = dataclasses.field(default=None, repr=False)
    options: MappingProxyType[str, Any] = dataclasses.field(default_factory=lambda: MappingProxyType({}))

    @property
    def is_static(self) -> bool:
        """A static endpoint is running as soon as it is requested: nothing to start."""
        return self.endpoint is not None


def parse_desktop_types(data: dict[str, Any], source: str = "<desktop types>") -> dict[str, DesktopType]:
    tables = data.get("desktop_types")
    if not isinstance(tables, dict):
        raise DesktopTypesError(f"{source}: expected tables like [desktop_types.ubuntu-vscode]")
    types: dict[str, DesktopType] = {}
    for name, table in tables.items():
        where = f"{source}: [desktop_types.{name}]"
        if not TYPE_NAME.match(name) or len(name) > MAX_TYPE_NAME:
            raise DesktopTypesError(
                f"{where}: a type name is lower-case letters, digits and single dashes, "
                f"at most {MAX_TYPE_NAME} characters"
            )
        if not isinstance(table, dict):
            raise DesktopTypesError(f"{where}: must be a table")
        unknown = set(table) - {"title", "image", "endpoint", "username", "password"} - _IMAGE_KEYS
        if unknown:
            raise DesktopTypesError(f"{where}: unknown keys {', '.join(sorted(unknown))}")
        title = table.get("title")
        if not isinstance(title, str) or not title.strip():
            raise DesktopTypesError(f"{where}: needs a title")
        image, endpoint = table.get("image"), table.get("endpoint")
        if (image is None) == (endpoint is None):
            raise DesktopTypesError(f"{where}: set exactly one of image or endpoint")
        if endpoint is not None:
            parts = urlsplit(str(endpoint))
            if parts.scheme not in ("wss", "ws") or not parts.hostname:
                raise DesktopTypesError(f"{where}: endpoint must be a wss:// address like wss://lab-pc:6901/")
        for key in ("image", "endpoint", "username", "password"):
            if key in table and not isinstance(table[key], str):
                raise DesktopTypesError(f"{where}: {key} must be a string")
        options = {k: v for k, v in table.items() if k in _IMAGE_KEYS}
        types[name] = DesktopType(
            name=name,
            title=title.strip(),
            image=image,
            endpoint=endpoint,
            username=table.get("username", "kasm_user"),
            password=table.get("password"),
            options=MappingProxyType(options),
        )
    return types


def load_desktop_types(path: Path | None) -> dict[str, DesktopType]:
    if path is None:
        return {}
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise DesktopTypesError(f"{path}: cannot be read ({exc.strerror})") from exc
    except tomllib.TOMLDecodeError as exc:
        raise DesktopTypesError(f"{path}: not valid TOML ({exc})") from exc
    return parse_desktop_types(data, str(path))
