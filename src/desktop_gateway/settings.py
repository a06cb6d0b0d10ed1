"""Settings from ``DESKTOP_GATEWAY_*`` environment variables.

Built by :func:`load_settings` from a mapping (``os.environ`` in production, a dict in tests); nothing is
read at import time. Every problem is collected and reported at once, each naming its variable, so an admin
fixes a broken deployment in one round instead of one error per restart.
"""

from __future__ import annotations

import dataclasses
import os
import re
import secrets
import ssl
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlsplit

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from desktop_gateway.logs import LOG_FORMATS

PREFIX = "DESKTOP_GATEWAY_"
DEFAULT_SQLITE_FILE = "desktop-gateway.db"
DEFAULT_SECRET_FILE = "desktop-gateway.secret"  # noqa: S105 (a file name)
DEFAULT_TYPES_FILE = "desktop-types.toml"
RUNTIMES = ("docker", "swarm")  # what runs the desktops: one Docker engine, or a Docker Swarm


class SettingsError(Exception):
    """The environment does not describe a usable configuration; the message says what to change."""


class Secret:
    """A string that never shows itself in ``repr``, ``str`` or logs; call :meth:`reveal` where it is used."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('**********')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and secrets.compare_digest(self._value, other._value)

    def __hash__(self) -> int:
        return hash(self._value)


DEFAULT_OIDC_SCOPES = "openid profile email groups roles uuid"  # what IServ offers


@dataclasses.dataclass(frozen=True, slots=True)
class OidcSettings:
    """The school's OpenID Connect provider (IServ): found through its discovery document."""

    issuer: str
    client_id: str
    client_secret: Secret
    scopes: str = DEFAULT_OIDC_SCOPES

    @property
    def discovery_url(self) -> str:
        return self.issuer.rstrip("/") + "/.well-known/openid-configuration"


@dataclasses.dataclass(frozen=True, slots=True)
class Settings:
    database_url: Secret
    secret_key: Secret
    secret_key_source: str
    docker_url: str
    container_host: str
    port_range: tuple[int, int]
    desktop_types_file: Path | None
    public_url: str | None
    session_max_age: int
    launch_token_max_age: int
    upstream_connect_timeout: float
    log_level: str
    embedded_database: bool
    forwarded_allow_ips: str = "127.0.0.1,::1"
    instance: str = "default"
    docker_tls: tuple[Path, Path, Path] | None = None
    start_timeout: int = 90
    idle_timeout: int = 30 * 60
    max_age: int = 8 * 3600
    idle_warning: int = 5 * 60
    max_desktops_per_user: int = 0
    max_desktops: int = 0
    maintenance_interval: int = 30
    container_bind_ip: str = "127.0.0.1"
    audit_retention_days: int = 365
    max_relays_per_user: int = 8
    log_format: str = "text"
    max_connections: int = 4000
    asset_timeout: int = 60
    session_idle_timeout: int = 2 * 3600
    oidc: OidcSettings | None = None
    admin_groups: frozenset[str] = frozenset()
    teacher_groups: frozenset[str] = frozenset()
    dev_login: bool = False
    metrics_token: Secret | None = None
    runtime: str = "docker"
    files_image: str | None = None
    max_upload: int = 100 * 1024 * 1024
    files_quota: int = 1024 * 1024 * 1024

    @property
    def database_url_for_display(self) -> str:
        """The database URL with any password masked, for log lines and ``doctor``."""
        return make_url(self.database_url.reveal()).render_as_string(hide_password=True)

    @property
    def public_origin(self) -> str | None:
        """``scheme://host[:port]`` of :attr:`public_url`, the only Origin a browser may come from."""
        if self.public_url is None:
            return None
        parts = urlsplit(self.public_url)
        return f"{parts.scheme}://{parts.netloc}".lower()

    def docker_tls_context(self) -> ssl.SSLContext | None:
        """Client certificates for a remote Docker host (``tcp://host:2376``), verified against its CA."""
        if self.docker_tls is None:
            return None
        ca, cert, key = self.docker_tls
        context = ssl.create_default_context(cafile=str(ca))
        context.load_cert_chain(str(cert), str(key))
        return context

    @property
    def secure_cookies(self) -> bool:
        return self.public_url is not None and self.public_url.startswith("https://")


def _int(env: Mapping[str, str], name: str, default: int, errors: list[str], minimum: int = 1) -> int:
    raw = env.get(PREFIX + name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        errors.append(f"{PREFIX}{name}: expected a whole number, got {raw!r}")
        return default
    if value < minimum:
        errors.append(f"{PREFIX}{name}: must be at least {minimum}, got {value}")
    return value


def _port_range(raw: str, errors: list[str]) -> tuple[int, int]:
    low_s, sep, high_s = raw.partition("-")
    try:
        low, high = int(low_s), int(high_s)
    except ValueError:
        low = high = 0
    if not sep or not (1024 <= low <= high <= 65535):
        errors.append(
            f"{PREFIX}PORT_RANGE: expected two ports from 1024 to 65535 like 7000-8000, got {raw!r}"
        )
        return (7000, 8000)
    return (low, high)


def _secret_key(env: Mapping[str, str], workdir: Path, errors: list[str]) -> tuple[Secret, str]:
    """The configured key, else one generated once and kept in the working directory.

    Kept in a file (created exclusively, mode 0600) so that restarts and sibling worker processes agree on
    it: a new key on every start would sign every student out.
    """
    raw = env.get(PREFIX + "SECRET_KEY", "")
    if raw:
        if len(raw) < 32:
            errors.append(
                f"{PREFIX}SECRET_KEY: must be at least 32 characters; generate one with "
                "`python3 -c 'import secrets; print(secrets.token_urlsafe(48))'`"
            )
        return Secret(raw), "environment"
    path = workdir / DEFAULT_SECRET_FILE
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        value = path.read_text().strip()
        if len(value) < 32:
            errors.append(f"{path}: the kept secret key is damaged; delete the file to generate a new one")
        return Secret(value), f"kept in {path}"
    except OSError as exc:
        errors.append(f"{PREFIX}SECRET_KEY is not set and {path} cannot be created ({exc.strerror})")
        return Secret(""), "missing"
    value = secrets.token_urlsafe(48)
    with os.fdopen(fd, "w") as f:
        f.write(value + "\n")
    return Secret(value), f"generated and kept in {path}"


def _instance(env: Mapping[str, str], errors: list[str]) -> str:
    raw = env.get(PREFIX + "INSTANCE", "") or "default"
    if not re.fullmatch(r"[a-z0-9][a-z0-9-]{0,30}", raw):
        errors.append(f"{PREFIX}INSTANCE: lower-case letters, digits and dashes, at most 31, got {raw!r}")
    return raw


def _docker_tls(env: Mapping[str, str], errors: list[str]) -> tuple[Path, Path, Path] | None:
    names = ("DOCKER_TLS_CA", "DOCKER_TLS_CERT", "DOCKER_TLS_KEY")
    raw = [env.get(PREFIX + n, "") for n in names]
    if not any(raw):
        return None
    if not all(raw):
        errors.append(f"{PREFIX}DOCKER_TLS_CA, _CERT and _KEY go together: set all three or none")
        return None
    paths = tuple(Path(r) for r in raw)
    for name, path in zip(names, paths, strict=True):
        if not path.is_file():
            errors.append(f"{PREFIX}{name}: no such file {str(path)!r}")
    return (paths[0], paths[1], paths[2])


def _names(env: Mapping[str, str], name: str) -> frozenset[str]:
    """A comma-separated list of group or role names, compared case-insensitively."""
    return frozenset(n.strip().lower() for n in env.get(PREFIX + name, "").split(",") if n.strip())


def _oidc(env: Mapping[str, str], errors: list[str]) -> OidcSettings | None:
    issuer = env.get(PREFIX + "OIDC_ISSUER", "").strip()
    client_id = env.get(PREFIX + "OIDC_CLIENT_ID", "").strip()
    client_secret = env.get(PREFIX + "OIDC_CLIENT_SECRET", "")
    if not issuer:
        if client_id or client_secret:
            errors.append(f"{PREFIX}OIDC_CLIENT_ID/_SECRET are set but {PREFIX}OIDC_ISSUER is not")
        return None
    parts = urlsplit(issuer)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        errors.append(
            f"{PREFIX}OIDC_ISSUER: expected an address like https://school.iserv.de, got {issuer!r}"
        )
    if not client_id or not client_secret:
        errors.append(
            f"{PREFIX}OIDC_CLIENT_ID and _SECRET: both are needed with {PREFIX}OIDC_ISSUER; the "
            "provider shows them when this gateway is registered with it as an OpenID Connect client"
        )
    scopes = " ".join(env.get(PREFIX + "OIDC_SCOPES", "").split()) or DEFAULT_OIDC_SCOPES
    if "openid" not in scopes.split():
        errors.append(f"{PREFIX}OIDC_SCOPES: must include openid, got {scopes!r}")
    return OidcSettings(
        issuer=issuer, client_id=client_id, client_secret=Secret(client_secret), scopes=scopes
    )


def _metrics_token(env: Mapping[str, str], errors: list[str]) -> Secret | None:
    """The bearer token Prometheus scrapes ``/metrics`` with; unset: only from loopback (see web.scrape)."""
    raw = env.get(PREFIX + "METRICS_TOKEN", "")
    if not raw:
        return None
    if len(raw) < 32 or not raw.isascii() or not raw.isprintable() or " " in raw:
        errors.append(
            f"{PREFIX}METRICS_TOKEN: at least 32 printable ASCII characters without spaces; generate one "
            "with `python3 -c 'import secrets; print(secrets.token_urlsafe(32))'`"
        )
    return Secret(raw)


def _runtime(env: Mapping[str, str], errors: list[str]) -> str:
    raw = (env.get(PREFIX + "RUNTIME", "") or "docker").strip().lower()
    if raw not in RUNTIMES:
        errors.append(
            f"{PREFIX}RUNTIME: docker (containers on the Docker engine at {PREFIX}DOCKER_URL) or swarm "
            f"(services on the Docker Swarm whose manager that engine is), got {raw!r}"
        )
    return raw


def _flag(env: Mapping[str, str], name: str, errors: list[str]) -> bool:
    raw = env.get(PREFIX + name, "").strip().lower()
    if raw in ("", "0", "false", "no", "off"):
        return False
    if raw in ("1", "true", "yes", "on"):
        return True
    errors.append(f"{PREFIX}{name}: 1 or 0, got {raw!r}")
    return False


def load_settings(env: Mapping[str, str] | None = None, workdir: Path | None = None) -> Settings:
    """Build :class:`Settings` from ``env`` (default ``os.environ``); raise :class:`SettingsError`."""
    env = os.environ if env is None else env
    workdir = Path.cwd() if workdir is None else workdir
    errors: list[str] = []

    raw_db = env.get(PREFIX + "DATABASE_URL", "")
    embedded = not raw_db
    if embedded:
        raw_db = f"sqlite+aiosqlite:///{workdir / DEFAULT_SQLITE_FILE}"
    try:
        url = make_url(raw_db)
        if url.drivername in ("postgresql", "postgres"):
            raw_db = url.set(drivername="postgresql+asyncpg").render_as_string(hide_password=False)
        elif url.drivername == "sqlite":
            raw_db = url.set(drivername="sqlite+aiosqlite").render_as_string(hide_password=False)
        elif url.drivername not in ("postgresql+asyncpg", "sqlite+aiosqlite"):
            errors.append(
                f"{PREFIX}DATABASE_URL: use postgresql+asyncpg://... or sqlite+aiosqlite:///..., "
                f"got the driver {url.drivername!r}"
            )
    except ArgumentError:
        errors.append(
            f"{PREFIX}DATABASE_URL: not a database URL (expected postgresql+asyncpg://user:pw@host/db)"
        )

    secret_key, secret_source = _secret_key(env, workdir, errors)

    types_raw = env.get(PREFIX + "DESKTOP_TYPES", "")
    types_file: Path | None
    if types_raw:
        types_file = Path(types_raw)
        if not types_file.is_file():
            errors.append(f"{PREFIX}DESKTOP_TYPES: no such file {types_raw!r}")
    else:
        candidate = workdir / DEFAULT_TYPES_FILE
        types_file = candidate if candidate.is_file() else None

    public_url = env.get(PREFIX + "PUBLIC_URL", "").rstrip("/") or None
    if public_url is not None:
        parts = urlsplit(public_url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            errors.append(
                f"{PREFIX}PUBLIC_URL: expected an address like https://desktop.school.example, "
                f"got {public_url!r}"
            )

    log_level = (env.get(PREFIX + "LOG_LEVEL", "") or "INFO").upper()
    if log_level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        errors.append(f"{PREFIX}LOG_LEVEL: one of DEBUG, INFO, WARNING, ERROR, got {log_level!r}")

    log_format = (env.get(PREFIX + "LOG_FORMAT", "") or "text").lower()
    if log_format not in LOG_FORMATS:
        errors.append(f"{PREFIX}LOG_FORMAT: one of {', '.join(LOG_FORMATS)}, got {log_format!r}")

    timeout_raw = env.get(PREFIX + "UPSTREAM_CONNECT_TIMEOUT", "") or "10"
    try:
        timeout = float(timeout_raw)
        if not 0 < timeout <= 300:
            raise ValueError
    except ValueError:
        errors.append(f"{PREFIX}UPSTREAM_CONNECT_TIMEOUT: seconds between 0 and 300, got {timeout_raw!r}")
        timeout = 10.0

    settings = Settings(
        database_url=Secret(raw_db),
        secret_key=secret_key,
        secret_key_source=secret_source,
        docker_url=env.get(PREFIX + "DOCKER_URL", "") or "unix:///var/run/docker.sock",
        container_host=env.get(PREFIX + "CONTAINER_HOST", "") or "127.0.0.1",
        port_range=_port_range(env.get(PREFIX + "PORT_RANGE", "") or "7000-8000", errors),
        desktop_types_file=types_file,
        public_url=public_url,
        session_max_age=_int(env, "SESSION_MAX_AGE", 12 * 3600, errors, minimum=60),
        launch_token_max_age=_int(env, "LAUNCH_TOKEN_MAX_AGE", 60, errors, minimum=5),
        upstream_connect_timeout=timeout,
        log_level=log_level,
        embedded_database=embedded,
        forwarded_allow_ips=env.get(PREFIX + "FORWARDED_ALLOW_IPS", "") or "127.0.0.1,::1",
        instance=_instance(env, errors),
        docker_tls=_docker_tls(env, errors),
        start_timeout=_int(env, "START_TIMEOUT", 90, errors, minimum=5),
        idle_timeout=_int(env, "IDLE_TIMEOUT", 30 * 60, errors, minimum=0),
        max_age=_int(env, "MAX_AGE", 8 * 3600, errors, minimum=0),
        idle_warning=_int(env, "IDLE_WARNING", 5 * 60, errors, minimum=0),
        max_desktops_per_user=_int(env, "MAX_DESKTOPS_PER_USER", 0, errors, minimum=0),
        max_desktops=_int(env, "MAX_DESKTOPS", 0, errors, minimum=0),
        maintenance_interval=_int(env, "MAINTENANCE_INTERVAL", 30, errors, minimum=1),
        container_bind_ip=env.get(PREFIX + "CONTAINER_BIND_IP", "")
        or env.get(PREFIX + "CONTAINER_HOST", "")
        or "127.0.0.1",
        audit_retention_days=_int(env, "AUDIT_RETENTION_DAYS", 365, errors, minimum=0),
        max_relays_per_user=_int(env, "MAX_RELAYS_PER_USER", 8, errors, minimum=0),
        log_format=log_format,
        max_connections=_int(env, "MAX_CONNECTIONS", 4000, errors, minimum=10),
        asset_timeout=_int(env, "ASSET_TIMEOUT", 60, errors, minimum=1),
        session_idle_timeout=_int(env, "SESSION_IDLE_TIMEOUT", 2 * 3600, errors, minimum=60),
        oidc=_oidc(env, errors),
        admin_groups=_names(env, "ADMIN_GROUPS"),
        teacher_groups=_names(env, "TEACHER_GROUPS"),
        dev_login=_flag(env, "DEV_LOGIN", errors),
        metrics_token=_metrics_token(env, errors),
        runtime=_runtime(env, errors),
        files_image=env.get(PREFIX + "FILES_IMAGE", "") or None,
        max_upload=_int(env, "MAX_UPLOAD", 100 * 1024 * 1024, errors),
        files_quota=_int(env, "FILES_QUOTA", 1024 * 1024 * 1024, errors, minimum=0),
    )
    multiproc_dir = env.get("PROMETHEUS_MULTIPROC_DIR", "")
    if multiproc_dir and not Path(multiproc_dir).is_dir():
        # prometheus_client would fail on it with a traceback when the first metric is made.
        errors.append(
            f"PROMETHEUS_MULTIPROC_DIR: no such directory {multiproc_dir!r} (the workers' metrics are kept "
            "there); create it or unset it"
        )
    if settings.dev_login and settings.secure_cookies:
        errors.append(
            f"{PREFIX}DEV_LOGIN: signs anyone in as anyone, so it is refused when {PREFIX}PUBLIC_URL "
            "is https (a real deployment); unset it"
        )
    if errors:
        raise SettingsError("the configuration has problems:\n" + "\n".join(f"  - {e}" for e in errors))
    return settings
