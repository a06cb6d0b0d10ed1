"""Desktop types, read from the TOML file named by ``DESKTOP_GATEWAY_DESKTOP_TYPES``.

One table per type, ``[desktop_types.<name>]``, with a ``title`` and either an ``image`` (a container the
gateway runs) or an ``endpoint`` (a KasmVNC desktop that already runs elsewhere, e.g. a lab machine).
``constraints`` and ``reservations`` say where Docker Swarm may place an image type's desktops
(``DESKTOP_GATEWAY_RUNTIME=swarm``); one Docker engine has nowhere else to put them and ignores both.

A type's optional ``icon`` is one of the simple icons shipped in the package (``icons/``) or an image file
on the gateway's machine; either is served by the gateway itself (``/static/...``), since its pages load
nothing from other sites.
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
from pathlib import Path
from types import MappingProxyType
from typing import Any
from urllib.parse import urlsplit

from desktop_gateway.access import ROLES, TypeRule
from desktop_gateway.db.models import Role
from desktop_gateway.runtime import Mount, Reservations

TYPE_NAME = re.compile(r"^[a-z0-9]+(?:-[a-z0-9]+)*$")
MAX_TYPE_NAME = 40
_IMAGE_KEYS = {"memory", "cpus", "shm_size", "env", "mounts", "constraints", "reservations"}
# Swarm's placement constraint: an attribute (node.labels.gpu, node.role, engine.labels.x, ...), == or !=,
# a value.
CONSTRAINT = re.compile(r"(node|engine)\.[A-Za-z0-9_.-]+\s*(==|!=)\s*\S+")
_RULE_KEYS = {"allowed_roles", "allowed_groups"}
ICONS_DIR = Path(__file__).with_name("icons")
BUILTIN_ICONS = tuple(sorted(p.stem for p in ICONS_DIR.glob("*.svg")))
# An icon file of the admin's own: a picture format browsers show in <img>, and small (a card shows it
# at 48 pixels).
ICON_TYPES = {".svg": "image/svg+xml", ".png": "image/png", ".webp": "image/webp"}
MAX_ICON_BYTES = 256 * 1024


class DesktopTypesError(Exception):
    """The desktop types file is unusable; the message names the file, the type and the key."""


@dataclasses.dataclass(frozen=True, slots=True)
class DesktopType:
    name: str
    title: str
    image: str | None = None
    description: str = ""
    endpoint: str | None = None
    username: str = "kasm_user"
    password: str | None = dataclasses.field(default=None, repr=False)
    memory: int | None = None
    nano_cpus: int | None = None
    shm_size: int = 512 * 1024 * 1024
    env: MappingProxyType[str, str] = dataclasses.field(default_factory=lambda: MappingProxyType({}))
    mounts: tuple[Mount, ...] = ()
    constraints: tuple[str, ...] = ()
    reservations: Reservations | None = None
    rule: TypeRule = dataclasses.field(default_factory=TypeRule)
    icon: str | None = None  # a built-in icon's name, or None
    icon_file: Path | None = None  # the admin's own icon file, or None

    @property
    def icon_url(self) -> str | None:
        """Where the gateway serves the type's icon (see ``web/static.py``), or None without one."""
        if self.icon is not None:
            return f"/static/icons/{self.icon}.svg"
        if self.icon_file is not None:
            return f"/static/types/{self.name}/icon{self.icon_file.suffix.lower()}"
        return None

    @property
    def is_static(self) -> bool:
        """A static endpoint is running as soon as it is requested: nothing to start."""
        return self.endpoint is not None


def parse_desktop_types(
    data: dict[str, Any], source: str = "<desktop types>", base: Path | None = None
) -> dict[str, DesktopType]:
    """``base``: the directory an icon file's relative path starts from (the types file's)."""
    tables = data.get("desktop_types", {})
    unknown = set(data) - {"desktop_types"}
    if unknown:
        raise DesktopTypesError(
            f"{source}: unknown top-level keys {', '.join(sorted(unknown))}; "
            "expected tables like [desktop_types.ubuntu-vscode]"
        )
    if not isinstance(tables, dict):
        raise DesktopTypesError(f"{source}: expected tables like [desktop_types.ubuntu-vscode]")
    types: dict[str, DesktopType] = {}
    for name, table in tables.items():
        where = f"{source}: [desktop_types.{name}]"
        if not TYPE_NAME.fullmatch(name) or len(name) > MAX_TYPE_NAME:
            raise DesktopTypesError(
                f"{where}: a type name is lower-case letters, digits and single dashes, "
                f"at most {MAX_TYPE_NAME} characters"
            )
        if not isinstance(table, dict):
            raise DesktopTypesError(f"{where}: must be a table")
        unknown = (
            set(table)
            - {"title", "description", "image", "endpoint", "username", "password", "icon"}
            - _IMAGE_KEYS
            - _RULE_KEYS
        )
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
        for key in ("description", "image", "endpoint", "username", "password", "icon"):
            if key in table and not isinstance(table[key], str):
                raise DesktopTypesError(f"{where}: {key} must be a string")
        if endpoint is not None and set(table) & _IMAGE_KEYS:
            keys = ", ".join(sorted(set(table) & _IMAGE_KEYS))
            raise DesktopTypesError(f"{where}: {keys} only apply to image types")
        types[name] = DesktopType(
            name=name,
            title=title.strip(),
            description=str(table.get("description", "")).strip(),
            image=image,
            endpoint=endpoint,
            username=table.get("username", "kasm_user"),
            password=table.get("password"),
            memory=_size(table["memory"], f"{where}: memory") if "memory" in table else None,
            nano_cpus=_cpus(table["cpus"], where) if "cpus" in table else None,
            shm_size=_size(table.get("shm_size", "512m"), f"{where}: shm_size"),
            env=MappingProxyType(_env(table.get("env", {}), where)),
            mounts=_mounts(table.get("mounts", []), where),
            constraints=_constraints(table.get("constraints", []), where),
            reservations=_reservations(table["reservations"], where) if "reservations" in table else None,
            rule=_rule(table, where),
            **_icon(table.get("icon"), where, base or Path.cwd()),
        )
    return types


def _icon(value: str | None, where: str, base: Path) -> dict[str, Any]:
    """``icon``: a built-in icon's name, or the path of an image file (relative to ``base``), never
    another site's address (the pages' policy would not load it, and it would tell that site who looks)."""
    if value is None:
        return {}
    if value in BUILTIN_ICONS:
        return {"icon": value}
    choices = f"one of {', '.join(BUILTIN_ICONS)}, or the path of an image file (SVG, PNG or WebP)"
    if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:|^//", value):
        raise DesktopTypesError(f"{where}: icon must be {choices} on the gateway, not an address")
    path = base / value
    if path.suffix.lower() not in ICON_TYPES or not path.is_file():
        raise DesktopTypesError(f"{where}: icon must be {choices}; {value!r} is neither")
    if path.stat().st_size > MAX_ICON_BYTES:
        raise DesktopTypesError(f"{where}: icon {value!r} is over {MAX_ICON_BYTES // 1024} KiB")
    return {"icon_file": path.resolve()}


def _rule(table: dict[str, Any], where: str) -> TypeRule:
    """Who may use the type: ``allowed_roles`` (admin, teacher, student) and ``allowed_groups`` (group
    ``act`` names as the sign-in provider sends them); neither given: everyone."""
    roles, groups = table.get("allowed_roles", []), table.get("allowed_groups", [])
    if not isinstance(roles, list) or not all(isinstance(r, str) and r in ROLES for r in roles):
        raise DesktopTypesError(
            f'{where}: allowed_roles is a list of {", ".join(ROLES)}, e.g. allowed_roles = ["teacher"]'
        )
    if not isinstance(groups, list) or not all(isinstance(g, str) and g.strip() for g in groups):
        raise DesktopTypesError(
            f'{where}: allowed_groups is a list of group short names, e.g. ["5a", "ag-robotik"]'
        )
    return TypeRule(frozenset(Role(r) for r in roles), frozenset(g.strip().lower() for g in groups))


_UNITS = {"": 1, "b": 1, "k": 1024, "m": 1024**2, "g": 1024**3}


def _size(value: object, where: str) -> int:
    """``"512m"``, ``"4g"`` or a number of bytes, as Docker's command line takes them."""
    match = re.fullmatch(r"(\d+)([bkmg]?)", str(value).strip().lower())
    if match is None or int(match.group(1)) <= 0:
        raise DesktopTypesError(f'{where}: a size like "512m" or "4g", got {value!r}')
    return int(match.group(1)) * _UNITS[match.group(2)]


def _cpus(value: object, where: str) -> int:
    if not isinstance(value, int | float) or isinstance(value, bool) or not 0 < value <= 256:
        raise DesktopTypesError(f"{where}: cpus must be a number like 2 or 1.5, got {value!r}")
    return int(value * 1_000_000_000)


def _env(value: object, where: str) -> dict[str, str]:
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str | int | float) for k, v in value.items()
    ):
        raise DesktopTypesError(
            f'{where}: env must be a table of strings, e.g. env = {{ TZ = "Europe/Berlin" }}'
        )
    reserved = {"VNC_PW", "VNC_VIEW_ONLY_PW"} & set(value)
    if reserved:
        raise DesktopTypesError(
            f"{where}: env may not set {', '.join(sorted(reserved))}: the gateway sets it"
        )
    return {k: str(v) for k, v in value.items()}


def _mounts(value: object, where: str) -> tuple[Mount, ...]:
    if not isinstance(value, list):
        raise DesktopTypesError(f"{where}: mounts must be a list of {{ source, target, read_only }} tables")
    mounts = []
    for item in value:
        if not (
            isinstance(item, dict)
            and isinstance(item.get("source"), str)
            and isinstance(item.get("target"), str)
            and str(item["source"]).startswith("/")
            and str(item["target"]).startswith("/")
            and isinstance(item.get("read_only", True), bool)
            and set(item) <= {"source", "target", "read_only"}
        ):
            raise DesktopTypesError(
                f'{where}: each mount is {{ source = "/srv/share", target = "/home/kasm-user/share", '
                f"read_only = true }}, got {item!r}"
            )
        mounts.append(Mount(item["source"], item["target"], item.get("read_only", True)))
    return tuple(mounts)


def _constraints(value: object, where: str) -> tuple[str, ...]:
    """Swarm placement constraints, e.g. ``["node.labels.gpu == true"]``: every one must hold."""
    if not isinstance(value, list) or not all(
        isinstance(c, str) and CONSTRAINT.fullmatch(c.strip()) for c in value
    ):
        raise DesktopTypesError(
            f'{where}: constraints is a list of Swarm placement constraints like "node.labels.gpu == true" '
            f'or "node.role != manager" (an attribute, == or !=, a value), got {value!r}'
        )
    return tuple(" ".join(c.split()) for c in value)


def _reservations(value: object, where: str) -> Reservations:
    """What a Swarm node must have free for the type's desktop: ``{ memory = "2g", cpus = 1 }``."""
    if not isinstance(value, dict) or not value or not set(value) <= {"memory", "cpus"}:
        raise DesktopTypesError(
            f'{where}: reservations is a table with memory and/or cpus, e.g. {{ memory = "2g", cpus = 1 }}, '
            f"got {value!r}"
        )
    return Reservations(
        memory=_size(value["memory"], f"{where}: reservations.memory") if "memory" in value else None,
        nano_cpus=_cpus(value["cpus"], f"{where}: reservations.cpus") if "cpus" in value else None,
    )


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
    return parse_desktop_types(data, str(path), path.parent)
