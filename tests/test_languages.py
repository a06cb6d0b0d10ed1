"""German and English: the catalogues agree, the browser's language is chosen and can be switched, and a
German page has no English left in what a person sees (on both databases)."""

from __future__ import annotations

import ast
import datetime as dt
import html
import json
import re
from collections.abc import Iterable
from html.parser import HTMLParser
from pathlib import Path

import httpx
import pytest
from markupsafe import Markup

import kasm_front
import secretlog
from conftest import StartGateway
from desktop_gateway import closepolicy, launch, people, relay
from desktop_gateway.db.models import DesktopState, Role
from desktop_gateway.launcher import stop_deadline
from desktop_gateway.settings import load_settings
from desktop_gateway.web import i18n, language, pages, signin_pages, unavailable
from desktop_gateway.web.i18n import CATALOGUE, PARAMETER, negotiate
from gatewaytest import RunningGateway, dev_sign_in, static_type

SOURCE = Path(i18n.__file__).parent.parent
TEMPLATES = SOURCE / "web" / "templates"
GERMAN = {"Accept-Language": "de-DE,de;q=0.9,en;q=0.8"}
# Keys looked up by a computed name, and where: the rest must appear literally in the code or templates.
COMPUTED = (
    "role.",  # home.html and dev_login.html: "role." ~ the person's role
    "state.",  # home.py: "state." + the desktop's state
    "dashboard.step.",  # home.py: "dashboard.step." + the start's step
    "launch.invalid",  # pages.py: "launch." + the launch refusal's name
    "launch.expired",
    "launch.used",
    "close.",  # the viewer's script, by the English reason
    "close_code.",  # the viewer's script, by code
    "types.pull_failed.",  # admin_types.py: "types.pull_failed." + why the pull failed
    "audit.kind.",  # admin_audit.html: "audit.kind." ~ the event's kind
)


def values(language: str) -> dict[str, str]:
    return dict(CATALOGUE.messages[language])


@pytest.mark.parametrize("other", [lang for lang in i18n.LANGUAGES if lang != "en"])
def test_every_language_has_the_same_keys(other: str) -> None:
    """Every key exists in English and in each other language, and no catalogue has a key the others lack."""
    english, translated = set(values("en")), set(values(other))
    assert english - translated == set(), f"missing in {other}"
    assert translated - english == set(), "missing in English"
    assert all(v.strip() for v in values(other).values()), f"an empty sentence in {other}"


@pytest.mark.parametrize("other", [lang for lang in i18n.LANGUAGES if lang != "en"])
def test_parameters_match_between_languages(other: str) -> None:
    """A sentence has the same named parameters in every language, and braces only ever name one."""
    for key, english in values("en").items():
        translated = values(other)[key]
        assert set(PARAMETER.findall(english)) == set(PARAMETER.findall(translated)), key
        for sentence in (english, translated):
            assert not re.search(r"[{}]", PARAMETER.sub("", sentence)), key


def test_german_is_translated() -> None:
    """A German sentence equal to its English one is a word German shares, never one left untranslated."""
    same = {k for k, v in values("en").items() if values("de")[k] == v}
    # "Desktop", "Desktops", "Desktop {name}"
    assert same == {"page.title", "home.title", "viewer.screen_title"}


def test_german_speaks_to_the_reader_as_du() -> None:
    """The German sentences say du throughout, never the formal Sie (pupils are 12 years old)."""
    formal = re.compile(r"\b(Sie|Ihr|Ihre|Ihren|Ihrem|Ihnen)\b")
    assert [v for v in values("de").values() if formal.search(v)] == []
    assert any(re.search(r"\bdu\b|\bdein", v) for v in values("de").values())


def test_sentences_fill_in_their_parameters_safely() -> None:
    """Parameters fill a sentence by name; in a page a parameter is escaped unless it is markup already."""
    assert CATALOGUE.text("de", "home.hello", name="Anna") == "Hallo, Anna"
    assert CATALOGUE.plural("de", "viewer.minutes", 1, minutes=1) == "1 Minute"
    assert CATALOGUE.plural("de", "viewer.minutes", 0, minutes=0) == "0 Minuten"
    assert str(CATALOGUE.markup("de", "home.hello", name="<b>Eve</b>")) == "Hallo, &lt;b&gt;Eve&lt;/b&gt;"
    bold = Markup("<strong>{}</strong>").format("ben-lab")
    page = str(CATALOGUE.markup("en", "launch.explain", desktop=bold, user="<i>ben</i>"))
    assert page.startswith("This opens the desktop <strong>ben-lab</strong> and signs")
    assert page.endswith(" in as &lt;i&gt;ben&lt;/i&gt;.")
    assert (
        str(CATALOGUE.markup("en", "home.none"))
        == "There is no desktop for you yet. Ask your teacher or the school&#39;s IT."
    )


def string_constants(path: Path) -> set[str]:
    return {
        n.value
        for n in ast.walk(ast.parse(path.read_text()))
        if isinstance(n, ast.Constant) and isinstance(n.value, str)
    }


def template_keys() -> set[str]:
    found: set[str] = set()
    for template in TEMPLATES.glob("*.html"):
        text = template.read_text()
        found |= set(re.findall(r"""\bt\(\s*["']([a-z_.0-9]+)["']\s*[,)]""", text))
        # The viewer's script reads its section of the catalogue as say.text.<name>.
        found |= {f"viewer.{name}" for name in re.findall(r"\bsay\.text\.([a-z_]+)", text)}
    return found


def keys_in_code() -> set[str]:
    """String constants of the package that look like catalogue keys (a known section, a dot, a name)."""
    sections = {key.partition(".")[0] for key in values("en")}
    found: set[str] = set()
    for path in SOURCE.rglob("*.py"):
        for constant in string_constants(path):
            section, dot, rest = constant.partition(".")
            if dot and section in sections and re.fullmatch(r"[a-z0-9_]+", rest) and rest != "html":
                plural = f"{constant}_one" in values("en")  # Catalogue.plural adds _one or _other
                found |= {f"{constant}_one", f"{constant}_other"} if plural else {constant}
    return found


def test_every_key_used_exists_and_every_key_is_used() -> None:
    """Each key the templates and the code look up is in the catalogue, and each catalogue key is used."""
    used = template_keys() | keys_in_code()
    assert used - set(values("en")) == set(), "looked up but not in the catalogue"
    for role in Role:
        assert f"role.{role.value}" in values("en")
    for state in DesktopState:
        assert f"state.{state.value}" in values("en")
    for refusal in launch.LaunchRefusal:
        assert f"launch.{refusal.name.lower()}" in values("en")
    unused = {k for k in values("en") if k not in used and not k.startswith(COMPUTED)}
    assert unused == set(), "in the catalogue but never looked up"


def test_pages_name_their_sentences_by_key() -> None:
    """Every written-out heading and sentence given to a message page or the Jinja ``t`` is a catalogue
    key, so an English sentence written into the code fails here rather than on a German page."""
    given: list[tuple[str, int, str]] = []
    for path in SOURCE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call):
                continue
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            if name in ("message", "t"):
                arguments = node.args[1:3] if name == "message" else node.args[:1]
                given += [
                    (path.name, a.lineno, a.value)
                    for a in arguments
                    if isinstance(a, ast.Constant) and isinstance(a.value, str)
                ]
    assert given, "no message pages found"
    assert [g for g in given if g[2] not in values("en")] == []


def close_frames() -> list[closepolicy.Close]:
    modules = (closepolicy, relay)
    return [v for m in modules for v in vars(m).values() if isinstance(v, closepolicy.Close)] + [
        closepolicy.to_browser_after_container_close(4000, "")
    ]


def test_every_close_reason_has_a_sentence_in_each_language() -> None:
    """The English catalogue holds each close frame's reason word for word (the wire stays English), so
    the viewer finds its sentence in the page's language; codes without a known reason have one too."""
    english = CATALOGUE.from_english("en", "close.")
    reasons = {c.reason for c in close_frames()} | {r.close_reason for r in unavailable.REFUSALS.values()}
    assert reasons - set(english) == set()
    german = CATALOGUE.from_english("de", "close.")
    assert all(german[reason] != reason for reason in reasons)
    for key in CATALOGUE.section("en", "close_code."):
        assert key == "other" or closepolicy.sendable(int(key)), key
    for english_sentence in english:
        assert len(english_sentence.encode()) <= closepolicy.MAX_REASON_BYTES


def test_sentences_other_modules_write_are_the_catalogues_english() -> None:
    """Launch and sign-in refusals read in English exactly as before; the catalogue has them word for word."""
    for refusal in launch.LaunchRefusal:
        assert CATALOGUE.text("en", f"launch.{refusal.name.lower()}") == refusal.value
    for sentence, key in signin_pages.SIGN_IN_REFUSALS.items():
        assert CATALOGUE.text("en", key) == sentence
    assert set(signin_pages.SIGN_IN_REFUSALS) == {people.BLOCKED, people.NO_SUBJECT}


@pytest.mark.parametrize(
    ("header", "cookie", "expected"),
    [
        ("de-DE,de;q=0.9,en;q=0.8", None, "de"),
        ("de-AT", None, "de"),
        ("DE-ch", None, "de"),
        ("en-GB,en;q=0.9,de;q=0.8", None, "en"),
        ("fr-FR,fr;q=0.9,de;q=0.7,en;q=0.5", None, "de"),  # the first the gateway speaks, by weight
        ("en;q=0.4,de;q=0.6", None, "de"),
        ("de;q=0,en", None, "en"),
        ("de;q=0, *", None, "en"),
        ("en;q=0, *", None, "de"),  # anything but English
        ("fr, *;q=0.1", None, "en"),
        ("fr-FR,it", None, "en"),
        (None, None, "en"),
        ("", None, "en"),
        (";;;,,,q=,de;q=abc,de;q=2", None, "en"),  # garbage, and weights out of range, are skipped
        ("de;q=nan", None, "en"),
        ("\x00\xff, de", None, "de"),
        ("de", "en", "en"),  # the switch wins over the browser
        ("en", "de", "de"),
        ("de", "fr", "de"),  # a cookie naming no language of ours is ignored
        ("x," * 10_000 + "de", None, "en"),  # a header no browser sends: read only so far
    ],
)
def test_negotiate(header: str | None, cookie: str | None, expected: str) -> None:
    """The switch's cookie wins, then the best-weighted Accept-Language range spoken here, else English."""
    assert negotiate(header, cookie) == expected


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("/", "/"),
        ("/desktop/anna-lab", "/desktop/anna-lab"),
        (
            "/desktop/a/vnc.html?autoconnect=1&path=desktop/a/websockify",
            "/desktop/a/vnc.html?autoconnect=1&path=desktop/a/websockify",
        ),
        ("//evil.example/", "/"),
        ("/\\evil.example/", "/"),
        ("/\t/evil.example/", "/"),
        ("/\n/evil.example/", "/"),
        ("https://evil.example/", "/"),
        ("javascript:alert(1)", "/"),
        ("evil.example", "/"),
        ("", "/"),
    ],
)
def test_the_switch_only_goes_back_to_this_gateway(raw: str, expected: str) -> None:
    """The switch's way back is a path of this gateway; anything that could leave goes to the start page."""
    assert language.back_to(raw) == expected


def test_language_cookie_is_remembered_for_a_year() -> None:
    """The language cookie lasts a year, rides top-level links (Lax), and is Secure behind https."""
    assert (
        language.cookie_header("de", secure=False)
        == "dg_lang=de; Path=/; Max-Age=31536000; HttpOnly; SameSite=Lax"
    )
    assert language.cookie_header("en", secure=True).endswith("; Secure")


@pytest.mark.parametrize(
    ("idle_timeout", "max_age", "idle_for", "kind", "why"),
    [
        ("1800", "28800", 0, "idle", "30 Minuten nicht benutzt"),
        ("60", "3600", 0, "idle", "1 Minute nicht benutzt"),
        ("1800", "3600", 3000, "max_age", "läuft schon 1 Stunde, länger geht nicht"),
        ("0", "7200", 0, "max_age", "läuft schon 2 Stunden, länger geht nicht"),
    ],
)
def test_the_viewer_says_why_a_desktop_will_be_stopped(
    tmp_path: Path, idle_timeout: str, max_age: str, idle_for: int, kind: str, why: str
) -> None:
    """The nearer of the idle and the age limit decides the reason, which the viewer says in German,
    singular and plural alike."""
    settings = load_settings(
        {"DESKTOP_GATEWAY_IDLE_TIMEOUT": idle_timeout, "DESKTOP_GATEWAY_MAX_AGE": max_age}, workdir=tmp_path
    )
    started = dt.datetime(2025, 3, 1, 8, 0, tzinfo=dt.UTC)
    deadline = stop_deadline(settings, started, started + dt.timedelta(seconds=idle_for))
    assert deadline is not None
    assert pages.stop_kind(settings, started, deadline[0]) == kind
    assert pages.viewer_sentences(settings, "de")["why"][kind] == why  # type: ignore[index]


class VisibleText(HTMLParser):
    """What a person sees of a page: text outside scripts and styles, and the attributes a browser shows.
    Text inside an element marked with another ``lang`` is kept apart (the switch names each language in
    itself)."""

    SHOWN = ("title", "aria-label", "placeholder", "alt")
    VOID = frozenset(
        {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "wbr"}
    )

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.open: list[tuple[str, str | None]] = []
        self.page_language: str | None = None
        self.texts: list[str] = []
        self.foreign: list[str] = []

    def language(self) -> str | None:
        return next((lang for _, lang in reversed(self.open) if lang), None)

    def add(self, text: str, lang: str | None) -> None:
        text = " ".join(text.split())
        if text:
            (self.texts if lang == self.page_language else self.foreign).append(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        if tag == "html":
            self.page_language = attributes.get("lang")
        lang = attributes.get("lang") or self.language()
        for name in self.SHOWN:
            self.add(attributes.get(name) or "", lang)
        if tag == "input" and attributes.get("type") in ("submit", "button"):
            self.add(attributes.get("value") or "", lang)
        if tag not in self.VOID:
            self.open.append((tag, attributes.get("lang")))

    def handle_endtag(self, tag: str) -> None:
        while self.open and self.open.pop()[0] != tag:
            pass

    def handle_data(self, data: str) -> None:
        if not any(tag in ("script", "style") for tag, _ in self.open):
            self.add(data, self.language())


def visible(html: str) -> VisibleText:
    parser = VisibleText()
    parser.feed(html)
    parser.close()
    return parser


def pattern(sentence: str) -> re.Pattern[str]:
    parts = PARAMETER.split(sentence)  # literal, name, literal, ...
    return re.compile("".join(re.escape(p) if i % 2 == 0 else ".+?" for i, p in enumerate(parts)))


def pieces(sentence: str) -> set[str]:
    """The literal parts of a sentence with parameters: a parameter set in bold splits it in text nodes."""
    parts = PARAMETER.split(sentence)
    return (
        {" ".join(p.split()) for i, p in enumerate(parts) if i % 2 == 0 and p.strip()}
        if len(parts) > 1
        else set()
    )


GERMAN_PATTERNS = [pattern(v) for v in values("de").values()]
GERMAN_PIECES = set().union(*(pieces(v) for v in values("de").values()))
ENGLISH_ONLY = [v for k, v in values("en").items() if v != values("de")[k]]


def not_german(texts: Iterable[str], data: set[str]) -> list[str]:
    """The texts that are neither a German catalogue sentence (or part of one) nor data of the page."""
    return [
        text
        for text in texts
        if text not in data
        and not text.isdigit()
        and text not in GERMAN_PIECES
        and not any(p.fullmatch(text) for p in GERMAN_PATTERNS)
    ]


def english_left(texts: list[str]) -> list[str]:
    """English catalogue sentences found in ``texts``: whole, or a part of three words or more."""
    joined = " | ".join(texts)
    found = [e for e in ENGLISH_ONLY if any(pattern(e).fullmatch(t) for t in texts)]
    found += [
        p
        for e in ENGLISH_ONLY
        for p in pieces(e) | ({e} if "{" not in e else set())
        if len(p.split()) >= 3 and p in joined
    ]
    return found


def where(page: httpx.Response) -> str:
    """The page's method and path for a failure's message, without a launch link's token."""
    return f"{page.request.method} {re.sub(r'/launch/[^/?]+', '/launch/<token>', page.request.url.path)}"


def assert_german(page: httpx.Response, data: set[str]) -> VisibleText:
    assert page.headers["content-language"] == "de", where(page)
    shown = visible(page.text)
    assert shown.page_language == "de", where(page)
    assert not_german(shown.texts, data) == [], f"{where(page)}: not German"
    assert english_left(shown.texts) == [], f"{where(page)}: English left"
    assert set(shown.foreign) <= {"English"}, f"{where(page)}: only the switch names another language"
    return shown


def assert_german_text(page: httpx.Response) -> None:
    """A plain-text answer: one German catalogue sentence."""
    text = page.text.strip()
    assert text in values("de").values(), f"{where(page)}: {text!r}"
    assert text not in ENGLISH_ONLY, f"{where(page)}: {text!r}"


async def german_gateway(start_gateway: StartGateway, kasm: kasm_front.KasmFront) -> RunningGateway:
    types = (
        static_type("lab", kasm.port, title="Informatik-Labor")
        + static_type("lehrerzimmer", kasm.port, title="Lehrerzimmer").rstrip()
        + '\nallowed_roles = ["teacher"]\n'
    )
    return await start_gateway(types, dev_login="1", idle_timeout="1800", max_age="28800")


async def test_every_german_page_is_german(start_gateway: StartGateway, kasm: kasm_front.KasmFront) -> None:
    """Every page in German (Accept-Language: de) shows only German catalogue sentences and the page's own
    data, the dev sign-in's banner included; the viewer's script gets its sentences in German."""
    gw = await german_gateway(start_gateway, kasm)
    data = {"anna", "Anna", "ben", "anna-lab", "ben-lab", "Informatik-Labor", "Lehrerzimmer"}
    origin = {"Origin": gw.base_url}
    async with httpx.AsyncClient(base_url=gw.base_url, headers=GERMAN) as stranger:
        assert_german(await stranger.get("/"), data)
        assert_german(await stranger.get("/dev-login"), data)
        bad_name = await stranger.post("/dev-login", data={"name": "Ä", "role": "student"}, headers=origin)
        assert bad_name.status_code == 422
        assert any(text.startswith("Der Name muss") for text in assert_german(bad_name, data).texts)
        assert_german(
            await stranger.post("/dev-login", data={"name": "x", "role": "boss"}, headers=origin), data
        )
        assert_german(await stranger.get("/login"), data)
        assert_german(await stranger.get("/desktop/anna-lab"), data)
        assert_german(await stranger.get("/launch/not-a-token"), data)
        assert_german(await stranger.post("/start/lab", headers=origin), data)
        assert_german_text(await stranger.get("/no-such-page"))
        assert_german_text(await stranger.post("/logout", headers={"Origin": "https://evil.example"}))

        ben = await gw.start_desktop("ben", "lab")
        link = ben["launch_url"].removeprefix(gw.base_url)
        secretlog.used(link.rpartition("/")[2])
        launch_page = await stranger.get(link)
        assert "<strong>ben-lab</strong>" in launch_page.text
        assert_german(launch_page, data)
        action = re.search(r'<form id="launch" method="post" action="([^"]+)">', launch_page.text)
        assert action is not None
        assert (await stranger.post(action.group(1), headers=origin)).status_code == 303
        assert_german(await stranger.get(link), data)  # used up

    anna = await dev_sign_in(gw, "anna", "student")
    anna.headers.update(GERMAN)
    try:
        home = assert_german(await anna.get("/"), data)
        assert {"Hallo, Anna", "Schüler:in", "aus", "Starten"} <= set(home.texts)
        assert_german(await anna.post("/start/lehrerzimmer", headers=origin), data)  # for teachers only
        assert_german(await anna.post("/start/nope", headers=origin), data)
        assert (await anna.post("/start/lab", headers=origin)).status_code == 303
        assert "Öffnen" in assert_german(await anna.get("/"), data).texts
        viewer = await anna.get("/desktop/anna-lab")
        assert "Verbindung wird aufgebaut …" in assert_german(viewer, data).texts
        said = re.search(r"const say = (.*);$", viewer.text, re.MULTILINE)
        assert said is not None
        sentences = json.loads(said.group(1))
        assert sentences == pages.viewer_sentences(gw.settings, "de")
        assert sentences["why"] == {
            "idle": "30 Minuten nicht benutzt",
            "max_age": "läuft schon 8 Stunden, länger geht nicht",
        }
        shown = [*sentences["text"].values(), *sentences["why"].values(), *sentences["close"].values()]
        assert not_german([*shown, *sentences["closeCodes"].values()], set()) == []
        assert english_left(shown) == []
        assert sentences["showFailureReason"] is False
        assert_german(await anna.get("/desktop/nobodys-lab"), data)
        assert_german(await anna.get("/admin"), data)  # for admins only
        assert_german(await anna.post("/logout", headers=origin), data)
    finally:
        await anna.aclose()

    async with httpx.AsyncClient(base_url=gw.base_url, headers=GERMAN) as stranger:
        assert_german(await stranger.get("/admin"), data)
        assert_german(await stranger.post("/admin/desktops/stop-idle", headers=origin), data)
    ada = await dev_sign_in(gw, "ada", "admin", "5a")
    ada.headers.update(GERMAN)
    try:
        admin_page = await ada.get("/admin")
        times = set(re.findall(r"<time [^>]*>([^<]+)</time>", admin_page.text))
        assert times
        admin_data = data | times | {"ada", "Ada", "5a", "ben-lab", "lab", f"127.0.0.1:{kasm.port}"}
        admin_shown = assert_german(admin_page, admin_data)
        assert {"Alle Desktops", "Personen", "Beenden", "Sperren"} <= set(admin_shown.texts)
        stopped = await ada.post("/admin/desktops/stop-all", data={"confirm": "yes"}, headers=origin)
        assert_german(await ada.get(stopped.headers["location"]), admin_data)
        assert_german(await ada.post("/admin/desktops/stop-all", headers=origin), admin_data)
        assert_german(await ada.post("/admin/desktops/stop-idle"), admin_data)  # no Origin
    finally:
        await ada.aclose()


async def test_the_admins_other_pages_are_german(
    start_gateway: StartGateway, kasm: kasm_front.KasmFront
) -> None:
    """The desktop types, assignments and audit log pages in German, with their refusals and sentences
    for bad input; only the page's data (names, times, the log's English details) is not a sentence."""
    gw = await german_gateway(start_gateway, kasm)
    origin = {"Origin": gw.base_url}
    async with httpx.AsyncClient(base_url=gw.base_url, headers=GERMAN) as stranger:
        for path in ("/admin/types", "/admin/grants", "/admin/audit"):
            assert_german(await stranger.get(path), set())
        assert_german(await stranger.post("/admin/grants", headers=origin), set())
    ada = await dev_sign_in(gw, "ada", "admin", "5a")
    ada.headers.update(GERMAN)
    address = f"wss://127.0.0.1:{kasm.port}/"
    data = {"ada", "lab", "lehrerzimmer", "Informatik-Labor", "Lehrerzimmer", address, "7a"}
    try:
        types = assert_german(await ada.get("/admin/types"), data)
        assert {"Desktop-Arten", "feste Adresse", "alle", "Lehrkraft"} <= set(types.texts)
        assert_german(await ada.post("/admin/types/lab/pull", headers=origin), data)
        grant = {"desktop_type": "lab", "whom": "group", "name": "7a"}
        added = await ada.post("/admin/grants", data=grant, headers=origin)
        grants = await ada.get(added.headers["location"])
        times = set(re.findall(r"<time [^>]*>([^<]+)</time>", grants.text))
        assert "Die Freigabe ist gespeichert." in assert_german(grants, data | times).texts
        for bad in ({**grant, "name": "niemand", "whom": "user"}, {**grant, "desktop_type": "x"}, {}):
            refused = await ada.post("/admin/grants", data=bad, headers=origin)
            assert refused.status_code == 422
            assert_german(refused, data | times)
        remove = re.search(r'action="(/admin/grants/\d+/remove)"', grants.text)
        assert remove is not None
        assert_german(await ada.post(remove.group(1), headers=origin), data | times)
        await gw.gateway.audit.flush()
        log = await ada.get("/admin/audit")
        times |= set(re.findall(r"<time [^>]*>([^<]+)</time>", log.text))
        details = set(re.findall(r'<td class="detail">([^<]*)</td>', log.text))
        shown = assert_german(log, data | times | {html.unescape(d) for d in details} | {"Ada", "5a"})
        assert {"Protokoll", "Anmeldung", "freigegeben"} <= set(shown.texts)
        assert_german(await ada.get("/admin/audit", params={"from": "gestern"}), data)
    finally:
        await ada.aclose()


async def test_the_switch_changes_the_language_and_remembers_it(
    start_gateway: StartGateway, kasm: kasm_front.KasmFront
) -> None:
    """The switch on a page sets the cookie and shows that page again in the chosen language; the cookie
    then wins over the browser's Accept-Language, visit after visit."""
    gw = await german_gateway(start_gateway, kasm)
    async with httpx.AsyncClient(base_url=gw.base_url, headers=GERMAN) as browser:
        page = await browser.get("/dev-login")
        assert '<html lang="de">' in page.text
        form = re.search(r'<form class="language" method="post" action="/language"', page.text)
        assert form is not None
        assert 'name="next" value="/dev-login"' in page.text
        assert 'name="lang" value="en" lang="en">English</button>' in page.text

        switched = await browser.post(
            "/language", data={"lang": "en", "next": "/dev-login"}, headers={"Origin": gw.base_url}
        )
        assert switched.status_code == 303
        assert switched.headers["location"] == "/dev-login"
        assert switched.headers["set-cookie"] == language.cookie_header("en", secure=False)
        again = await browser.get("/dev-login")  # Accept-Language still says German
        assert '<html lang="en">' in again.text
        assert "Development sign-in" in again.text
        assert again.headers["content-language"] == "en"
        remembered = httpx.Cookies(browser.cookies)

    # Another visit, with the remembered cookie and a German browser.
    async with httpx.AsyncClient(base_url=gw.base_url, headers=GERMAN, cookies=remembered) as later:
        assert '<html lang="en">' in (await later.get("/")).text
        back = await later.post(
            "/language", data={"lang": "de", "next": "/"}, headers={"Origin": gw.base_url}
        )
        assert back.headers["location"] == "/"
        assert "Desktops im Browser" in (await later.get("/")).text

    # A launch link's page: the switch comes back to it (the link stays unused, its token out of the logs).
    ben = await gw.start_desktop("ben", "lab")
    link = ben["launch_url"].removeprefix(gw.base_url)
    secretlog.used(link.rpartition("/")[2])
    async with httpx.AsyncClient(base_url=gw.base_url) as browser:
        assert f'name="next" value="{link}"' in (await browser.get(link)).text
        switched = await browser.post(
            "/language", data={"lang": "de", "next": link}, headers={"Origin": gw.base_url}
        )
        assert switched.headers["location"] == link
        assert "Deinen Desktop öffnen" in (await browser.get(link)).text

    # A student's viewer: the switch sits in its header and comes back to the desktop.
    anna = await dev_sign_in(gw, "anna", "student")
    try:
        assert (await anna.post("/start/lab", headers={"Origin": gw.base_url})).status_code == 303
        viewer = await anna.get("/desktop/anna-lab")
        assert 'name="next" value="/desktop/anna-lab"' in viewer.text
        assert 'lang="de">Deutsch</button>' in viewer.text
        switched = await anna.post(
            "/language", data={"lang": "de", "next": "/desktop/anna-lab"}, headers={"Origin": gw.base_url}
        )
        assert switched.headers["location"] == "/desktop/anna-lab"
        assert "Verbindung wird aufgebaut …" in (await anna.get("/desktop/anna-lab")).text
    finally:
        await anna.aclose()


async def test_the_switch_refuses_other_sites_and_unknown_languages(
    start_gateway: StartGateway, kasm: kasm_front.KasmFront
) -> None:
    """A switch posted by another site, or for a language not offered, changes nothing and says why; a
    way back that leaves the gateway goes to the start page instead."""
    gw = await german_gateway(start_gateway, kasm)
    async with httpx.AsyncClient(base_url=gw.base_url, headers=GERMAN) as browser:
        for origin in ({"Origin": "https://evil.example"}, {}):
            refused = await browser.post("/language", data={"lang": "en", "next": "/"}, headers=origin)
            assert refused.status_code == 403
            assert "set-cookie" not in refused.headers
            assert "Wechsle die Sprache auf den Seiten dieses Gateways." in refused.text
        unknown = await browser.post("/language", data={"lang": "fr"}, headers={"Origin": gw.base_url})
        assert unknown.status_code == 422
        assert "Diese Sprache gibt es hier nicht." in unknown.text
        assert "set-cookie" not in unknown.headers
        away = await browser.post(
            "/language", data={"lang": "de", "next": "//evil.example/"}, headers={"Origin": gw.base_url}
        )
        assert away.status_code == 303
        assert away.headers["location"] == "/"


async def test_english_pages_stay_as_they_were(
    start_gateway: StartGateway, kasm: kasm_front.KasmFront
) -> None:
    """Without a German preference the pages are English, in the words they always had."""
    gw = await german_gateway(start_gateway, kasm)
    async with httpx.AsyncClient(base_url=gw.base_url, headers={"Accept-Language": "fr-FR"}) as browser:
        home = await browser.get("/")
        assert '<html lang="en">' in home.text
        assert home.headers["content-language"] == "en"
        assert "Development sign-in is on: anyone can sign in as anyone." in home.text
        assert 'lang="de">Deutsch</button>' in home.text
        assert (await browser.get("/no-such-page")).text == "Not Found\n"
        shown = visible((await browser.get("/launch/not-a-token")).text)
        assert launch.LaunchRefusal.INVALID.value in shown.texts
        assert shown.foreign == ["Deutsch"]
