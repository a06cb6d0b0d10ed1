"""Settings from ``DESKTOP_GATEWAY_*`` variables and desktop types from TOML: pure unit tests, no server."""

from __future__ import annotations

import dataclasses
import stat
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

from desktop_gateway.desktop_types import (
    DesktopTypesError,
    load_desktop_types,
    parse_desktop_types,
)
from desktop_gateway.runtime import Reservations
from desktop_gateway.settings import (
    DEFAULT_SECRET_FILE,
    DEFAULT_SQLITE_FILE,
    DEFAULT_TYPES_FILE,
    SettingsError,
    load_settings,
)

EXAMPLE_TYPES = Path(__file__).resolve().parents[1] / "desktop-types.example.toml"
KEY = "k" * 40
PG = "DESKTOP_GATEWAY_DATABASE_URL"


def settings_error(env: dict[str, str], workdir: Path) -> str:
    with pytest.raises(SettingsError) as caught:
        load_settings(env, workdir)
    return str(caught.value)


# --- defaults ----------------------------------------------------------------------------------------


def test_empty_env_uses_embedded_sqlite_in_workdir(tmp_path: Path) -> None:
    """With no variables the database is SQLite (aiosqlite) in the working directory, marked embedded."""
    settings = load_settings({}, tmp_path)
    url = make_url(settings.database_url.reveal())
    assert url.drivername == "sqlite+aiosqlite"
    assert url.database == str(tmp_path / DEFAULT_SQLITE_FILE)
    assert settings.embedded_database is True


def test_empty_env_defaults(tmp_path: Path) -> None:
    """With no variables every other setting takes the documented default."""
    settings = load_settings({}, tmp_path)
    assert settings.port_range == (7000, 8000)
    assert settings.docker_url == "unix:///var/run/docker.sock"
    assert settings.container_host == "127.0.0.1"
    assert settings.desktop_types_file is None
    assert settings.public_url is None
    assert settings.public_origin is None
    assert settings.secure_cookies is False
    assert settings.session_max_age == 43200
    assert settings.launch_token_max_age == 60
    assert settings.upstream_connect_timeout == 10.0
    assert settings.log_level == "INFO"
    assert settings.forwarded_allow_ips == "127.0.0.1,::1"
    assert settings.audit_retention_days == 365
    assert settings.max_connections == 4000
    assert settings.asset_timeout == 60
    assert settings.max_relays_per_user == 8
    assert settings.log_format == "text"


def test_empty_values_mean_defaults(tmp_path: Path) -> None:
    """A variable set to the empty string (``VAR=`` in an env file) means its default, for every variable."""
    names = [
        "DATABASE_URL",
        "SECRET_KEY",
        "DOCKER_URL",
        "CONTAINER_HOST",
        "PORT_RANGE",
        "DESKTOP_TYPES",
        "PUBLIC_URL",
        "SESSION_MAX_AGE",
        "LAUNCH_TOKEN_MAX_AGE",
        "UPSTREAM_CONNECT_TIMEOUT",
        "LOG_LEVEL",
        "FORWARDED_ALLOW_IPS",
        "MAX_CONNECTIONS",
        "ASSET_TIMEOUT",
        "MAX_RELAYS_PER_USER",
        "LOG_FORMAT",
    ]
    blank = load_settings({f"DESKTOP_GATEWAY_{n}": "" for n in names}, tmp_path)
    default = load_settings({}, tmp_path)  # the second load reads the key the first one generated
    assert dataclasses.replace(blank, secret_key_source="") == dataclasses.replace(
        default, secret_key_source=""
    )


def test_secret_key_generated_once_with_mode_0600(tmp_path: Path) -> None:
    """Without SECRET_KEY a key is generated into the workdir (mode 0600) and the same key is used again."""
    first = load_settings({}, tmp_path)
    path = tmp_path / DEFAULT_SECRET_FILE
    assert path.is_file()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert first.secret_key_source == f"generated and kept in {path}"
    assert len(first.secret_key.reveal()) >= 32
    assert path.read_text().strip() == first.secret_key.reveal()

    second = load_settings({}, tmp_path)
    assert second.secret_key.reveal() == first.secret_key.reveal()
    assert second.secret_key_source == f"kept in {path}"


def test_configured_secret_key_writes_no_file(tmp_path: Path) -> None:
    """A SECRET_KEY from the environment is used as is and nothing is written to the workdir."""
    settings = load_settings({"DESKTOP_GATEWAY_SECRET_KEY": KEY}, tmp_path)
    assert settings.secret_key.reveal() == KEY
    assert settings.secret_key_source == "environment"
    assert not (tmp_path / DEFAULT_SECRET_FILE).exists()


def test_damaged_kept_secret_is_refused(tmp_path: Path) -> None:
    """A kept secret file that is too short is refused with advice to delete it, not silently used."""
    (tmp_path / DEFAULT_SECRET_FILE).write_text("short\n")
    message = settings_error({}, tmp_path)
    assert DEFAULT_SECRET_FILE in message
    assert "delete" in message


# --- bad values --------------------------------------------------------------------------------------


def test_bad_values_reported_together(tmp_path: Path) -> None:
    """Several bad values give one SettingsError that names each of their variables."""
    env = {
        "DESKTOP_GATEWAY_PORT_RANGE": "8000-7000",
        "DESKTOP_GATEWAY_LOG_LEVEL": "loud",
        "DESKTOP_GATEWAY_UPSTREAM_CONNECT_TIMEOUT": "soon",
        "DESKTOP_GATEWAY_SESSION_MAX_AGE": "a day",
        "DESKTOP_GATEWAY_LAUNCH_TOKEN_MAX_AGE": "1",
        "DESKTOP_GATEWAY_AUDIT_RETENTION_DAYS": "-1",
        "DESKTOP_GATEWAY_PUBLIC_URL": "desktop.school.example",
        "DESKTOP_GATEWAY_DESKTOP_TYPES": str(tmp_path / "missing.toml"),
        "DESKTOP_GATEWAY_SECRET_KEY": "too-short",
        PG: "mysql://gw:pw@db.school.example/gw",
    }
    message = settings_error(env, tmp_path)
    for name in env:
        assert name in message, f"{name} is not named in: {message}"
    # One line per problem, so an admin sees them as a list.
    assert message.count("\n  - ") == len(env)


@pytest.mark.parametrize("value", ["7000", "7000-", "a-b", "80-90", "7000-70000", "8000-7000"])
def test_bad_port_range_refused(tmp_path: Path, value: str) -> None:
    """A port range that is not two ports from 1024 to 65535, low to high, is refused."""
    assert "DESKTOP_GATEWAY_PORT_RANGE" in settings_error(
        {"DESKTOP_GATEWAY_PORT_RANGE": value, "DESKTOP_GATEWAY_SECRET_KEY": KEY}, tmp_path
    )


def test_port_range_parsed(tmp_path: Path) -> None:
    """A valid PORT_RANGE is parsed into (low, high); a single-port range is allowed."""
    env = {"DESKTOP_GATEWAY_SECRET_KEY": KEY}
    assert load_settings({**env, "DESKTOP_GATEWAY_PORT_RANGE": "20000-20100"}, tmp_path).port_range == (
        20000,
        20100,
    )
    assert load_settings({**env, "DESKTOP_GATEWAY_PORT_RANGE": "9000-9000"}, tmp_path).port_range == (
        9000,
        9000,
    )


def test_short_secret_key_refused(tmp_path: Path) -> None:
    """A SECRET_KEY under 32 characters is refused (with a way to generate one); 32 is accepted."""
    message = settings_error({"DESKTOP_GATEWAY_SECRET_KEY": "x" * 31}, tmp_path)
    assert "DESKTOP_GATEWAY_SECRET_KEY" in message
    assert "32" in message
    assert "x" * 31 not in message, "the rejected key itself is not echoed"
    assert load_settings({"DESKTOP_GATEWAY_SECRET_KEY": "x" * 32}, tmp_path).secret_key.reveal() == "x" * 32


# --- database URLs -----------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["postgresql", "postgres"])
def test_postgresql_url_rewritten_to_asyncpg(tmp_path: Path, scheme: str) -> None:
    """``postgresql://`` (and ``postgres://``) become ``postgresql+asyncpg://`` with everything else kept."""
    settings = load_settings(
        {PG: f"{scheme}://gw:s3cret@db.school.example:5433/gateway", "DESKTOP_GATEWAY_SECRET_KEY": KEY},
        tmp_path,
    )
    url = make_url(settings.database_url.reveal())
    assert url.drivername == "postgresql+asyncpg"
    assert (url.username, url.password, url.host, url.port, url.database) == (
        "gw",
        "s3cret",
        "db.school.example",
        5433,
        "gateway",
    )
    assert settings.embedded_database is False


def test_special_characters_in_password_survive_rewrite(tmp_path: Path) -> None:
    """A percent-encoded password (``p@ss/w:rd``) is still the same password after the driver rewrite."""
    settings = load_settings(
        {PG: "postgresql://gw:p%40ss%2Fw%3Ard@db.school.example/gateway", "DESKTOP_GATEWAY_SECRET_KEY": KEY},
        tmp_path,
    )
    url = make_url(settings.database_url.reveal())
    assert url.password == "p@ss/w:rd"
    assert url.host == "db.school.example"


def test_plain_sqlite_url_rewritten_to_aiosqlite(tmp_path: Path) -> None:
    """A configured ``sqlite:///`` URL uses aiosqlite and is not the embedded default."""
    path = tmp_path / "elsewhere.db"
    settings = load_settings({PG: f"sqlite:///{path}"}, tmp_path)
    url = make_url(settings.database_url.reveal())
    assert url.drivername == "sqlite+aiosqlite"
    assert url.database == str(path)
    assert settings.embedded_database is False


@pytest.mark.parametrize(
    "url",
    [
        "mysql://gw:hunter2@db/gw",
        "postgresql+psycopg2://gw:hunter2@db/gw",
        "postgresql+psycopg://gw:hunter2@db/gw",
        "sqlite+pysqlite:///x.db",
        "gw:hunter2@not a url",
    ],
)
def test_unsupported_database_url_refused(tmp_path: Path, url: str) -> None:
    """Drivers other than asyncpg and aiosqlite, and non-URLs, are refused naming DATABASE_URL."""
    message = settings_error({PG: url, "DESKTOP_GATEWAY_SECRET_KEY": KEY}, tmp_path)
    assert PG in message
    assert "hunter2" not in message, "the refused URL's password is not echoed"


def test_database_url_for_display_masks_password(tmp_path: Path) -> None:
    """``database_url_for_display`` keeps user, host and database but never shows the password."""
    settings = load_settings(
        {PG: "postgresql://gw:hunter2-secret@db.school.example/gateway", "DESKTOP_GATEWAY_SECRET_KEY": KEY},
        tmp_path,
    )
    shown = settings.database_url_for_display
    assert "hunter2-secret" not in shown
    assert shown == "postgresql+asyncpg://gw:***@db.school.example/gateway"


def test_secrets_never_in_repr_or_str(tmp_path: Path) -> None:
    """Neither the secret key nor the database password appears in ``repr`` or ``str`` of Settings."""
    settings = load_settings(
        {PG: "postgresql://gw:hunter2-secret@db.school.example/gateway", "DESKTOP_GATEWAY_SECRET_KEY": KEY},
        tmp_path,
    )
    for text in (repr(settings), str(settings), repr(settings.secret_key), str(settings.database_url)):
        assert KEY not in text
        assert "hunter2-secret" not in text
    assert settings.secret_key.reveal() == KEY


# --- public URL --------------------------------------------------------------------------------------


def test_public_origin_is_scheme_and_host(tmp_path: Path) -> None:
    """``public_origin`` is the lower-cased scheme://host[:port] of PUBLIC_URL; https means Secure cookies."""
    settings = load_settings(
        {
            "DESKTOP_GATEWAY_PUBLIC_URL": "https://Desktop.School.example/gateway/",
            "DESKTOP_GATEWAY_SECRET_KEY": KEY,
        },
        tmp_path,
    )
    assert settings.public_url == "https://Desktop.School.example/gateway"
    assert settings.public_origin == "https://desktop.school.example"
    assert settings.secure_cookies is True

    local = load_settings(
        {"DESKTOP_GATEWAY_PUBLIC_URL": "http://127.0.0.1:8080", "DESKTOP_GATEWAY_SECRET_KEY": KEY}, tmp_path
    )
    assert local.public_origin == "http://127.0.0.1:8080"
    assert local.secure_cookies is False


@pytest.mark.parametrize("value", ["desktop.school.example", "ftp://desktop.school.example", "https://"])
def test_bad_public_url_refused(tmp_path: Path, value: str) -> None:
    """A PUBLIC_URL that is not an http(s) address with a host is refused."""
    assert "DESKTOP_GATEWAY_PUBLIC_URL" in settings_error(
        {"DESKTOP_GATEWAY_PUBLIC_URL": value, "DESKTOP_GATEWAY_SECRET_KEY": KEY}, tmp_path
    )


# --- desktop types file location ---------------------------------------------------------------------


def test_types_file_found_in_workdir(tmp_path: Path) -> None:
    """Without DESKTOP_TYPES, ``desktop-types.toml`` in the workdir is used when it exists."""
    (tmp_path / DEFAULT_TYPES_FILE).write_text("")
    settings = load_settings({"DESKTOP_GATEWAY_SECRET_KEY": KEY}, tmp_path)
    assert settings.desktop_types_file == tmp_path / DEFAULT_TYPES_FILE


def test_types_file_from_env(tmp_path: Path) -> None:
    """DESKTOP_TYPES names the types file explicitly."""
    path = tmp_path / "types.toml"
    path.write_text("")
    settings = load_settings(
        {"DESKTOP_GATEWAY_DESKTOP_TYPES": str(path), "DESKTOP_GATEWAY_SECRET_KEY": KEY}, tmp_path
    )
    assert settings.desktop_types_file == path


# --- desktop types -----------------------------------------------------------------------------------


def test_example_types_file_parses() -> None:
    """The shipped example file defines ``ubuntu-vscode`` (an image) and ``lab-pc`` (an endpoint)."""
    types = load_desktop_types(EXAMPLE_TYPES)
    assert set(types) == {"ubuntu-vscode", "lab-pc"}

    vscode = types["ubuntu-vscode"]
    assert vscode.image == "kasmweb/vs-code:1.16.0"
    assert vscode.endpoint is None
    assert not vscode.is_static
    assert (vscode.memory, vscode.nano_cpus, vscode.shm_size) == (4 * 1024**3, 2_000_000_000, 512 * 1024**2)
    assert vscode.constraints == ("node.labels.gpu == true",)
    assert vscode.reservations == Reservations(memory=2 * 1024**3, nano_cpus=1_000_000_000)
    assert vscode.title
    assert vscode.description.startswith("A Linux desktop")

    lab = types["lab-pc"]
    assert lab.endpoint == "wss://lab-pc-01.school.example:6901/"
    assert lab.image is None
    assert lab.is_static
    assert lab.username == "kasm_user"
    assert lab.password == "change-me"
    assert "change-me" not in repr(lab), "the endpoint password is not in the type's repr"


def test_types_defaults() -> None:
    """An endpoint type without username and password uses ``kasm_user`` and no password."""
    types = parse_desktop_types(
        {"desktop_types": {"lab": {"title": " Lab ", "endpoint": "wss://127.0.0.1:6901/"}}}
    )
    assert types["lab"].username == "kasm_user"
    assert types["lab"].password is None
    assert types["lab"].title == "Lab"
    assert types["lab"].description == ""


def test_swarm_placement_of_a_type_parsed() -> None:
    """A type's Swarm constraints are kept (spaces evened out) and its reservations converted to bytes and
    nano-CPUs; a type without them has none."""
    types = parse_desktop_types(
        {
            "desktop_types": {
                "gpu": {
                    "title": "GPU",
                    "image": "i",
                    "constraints": ["node.labels.gpu==true", "node.role  !=  manager"],
                    "reservations": {"memory": "512m"},
                },
                "plain": {"title": "Plain", "image": "i"},
            }
        }
    )
    assert types["gpu"].constraints == ("node.labels.gpu==true", "node.role != manager")
    assert types["gpu"].reservations == Reservations(memory=512 * 1024**2, nano_cpus=None)
    assert (types["plain"].constraints, types["plain"].reservations) == ((), None)


def test_runtime_setting(tmp_path: Path) -> None:
    """``RUNTIME`` is docker by default, swarm when asked (any case), and anything else is refused with
    what the two mean."""
    assert load_settings({}, tmp_path).runtime == "docker"
    assert load_settings({"DESKTOP_GATEWAY_RUNTIME": "Swarm"}, tmp_path).runtime == "swarm"
    with pytest.raises(SettingsError, match=r"RUNTIME: docker \(containers on .* or swarm .*'kubernetes'"):
        load_settings({"DESKTOP_GATEWAY_RUNTIME": "kubernetes"}, tmp_path)


def test_no_types_file_means_no_types() -> None:
    """``load_desktop_types(None)`` is an empty set of types, not an error."""
    assert load_desktop_types(None) == {}


@pytest.mark.parametrize(
    ("table", "expected"),
    [
        ({"title": "T", "image": "kasmweb/chromium:1.16.0", "endpoint": "wss://pc:6901/"}, "exactly one"),
        ({"title": "T"}, "exactly one"),
        ({"title": "T", "endpoint": "https://pc:6901/"}, "wss://"),
        ({"title": "T", "endpoint": "pc:6901"}, "wss://"),
        ({"title": "T", "endpoint": "wss:///no-host"}, "wss://"),
        ({"title": "T", "image": "kasmweb/chromium:1.16.0", "memroy": "4g"}, "unknown keys memroy"),
        ({"image": "kasmweb/chromium:1.16.0"}, "title"),
        ({"title": "  ", "image": "kasmweb/chromium:1.16.0"}, "title"),
        ({"title": "T", "image": 5}, "image must be a string"),
        ({"title": "T", "endpoint": "wss://pc:6901/", "password": 1234}, "password must be a string"),
        ({"title": "T", "endpoint": "wss://pc:6901/", "description": ["x"]}, "description must be a string"),
        ({"title": "T", "image": "i", "constraints": "node.role == manager"}, "constraints is a list"),
        ({"title": "T", "image": "i", "constraints": ["gpu = true"]}, "constraints is a list"),
        ({"title": "T", "image": "i", "constraints": ["node.labels.gpu =="]}, "constraints is a list"),
        ({"title": "T", "image": "i", "reservations": {"gpus": 1}}, "reservations is a table"),
        ({"title": "T", "image": "i", "reservations": {}}, "reservations is a table"),
        ({"title": "T", "image": "i", "reservations": {"cpus": -1}}, "reservations.cpus"),
        ({"title": "T", "endpoint": "wss://pc:6901/", "constraints": []}, "only apply to image types"),
    ],
)
def test_bad_type_table_refused(table: dict[str, object], expected: str) -> None:
    """Both/neither image and endpoint, a bad endpoint, unknown keys or bad values are refused."""
    with pytest.raises(DesktopTypesError) as caught:
        parse_desktop_types({"desktop_types": {"lab": table}}, "types.toml")
    message = str(caught.value)
    assert expected in message
    assert "types.toml: [desktop_types.lab]" in message


@pytest.mark.parametrize(
    "name", ["Lab", "lab_pc", "lab--pc", "-lab", "lab-", "lab pc", "lab\n", "l" * 41, "", "läb"]
)
def test_bad_type_name_refused(name: str) -> None:
    """A type name must be lower-case letters, digits and single inner dashes, at most 40 characters."""
    with pytest.raises(DesktopTypesError, match="type name"):
        parse_desktop_types({"desktop_types": {name: {"title": "T", "endpoint": "wss://pc:6901/"}}})


def test_good_type_names_accepted() -> None:
    """Names like ``lab-pc-01`` and a 40-character name are accepted."""
    names = ["lab-pc-01", "x", "a" * 40, "ubuntu-22-04"]
    types = parse_desktop_types(
        {"desktop_types": {n: {"title": "T", "endpoint": "wss://pc:6901/"} for n in names}}
    )
    assert sorted(types) == sorted(names)


def test_missing_types_table_refused() -> None:
    """A file without ``[desktop_types.*]`` tables is refused with an example of the expected form."""
    with pytest.raises(DesktopTypesError, match=r"\[desktop_types\.ubuntu-vscode\]"):
        parse_desktop_types({"types": {}})


def test_invalid_toml_refused(tmp_path: Path) -> None:
    """A file that is not valid TOML is refused naming the file, as DesktopTypesError (not a traceback)."""
    path = tmp_path / "types.toml"
    path.write_text('[desktop_types.lab\ntitle = "Lab"\n')
    with pytest.raises(DesktopTypesError) as caught:
        load_desktop_types(path)
    assert str(path) in str(caught.value)
    assert "not valid TOML" in str(caught.value)


def test_unreadable_types_file_refused(tmp_path: Path) -> None:
    """A types file that cannot be read is refused naming the file."""
    path = tmp_path / "gone.toml"
    with pytest.raises(DesktopTypesError, match="cannot be read"):
        load_desktop_types(path)


def test_empty_types_file_means_no_types(tmp_path: Path) -> None:
    """An empty (or comment-only) types file is valid and defines no types, like having no file."""
    path = tmp_path / "types.toml"
    path.write_text("# no desktops yet\n")
    assert load_desktop_types(path) == {}
