"""German and English for what people read: the message catalogues, and which language a browser gets.

The catalogues are JSON files of flat dotted keys, ``locales/<language>.json``, read once at import. A
sentence's variable parts are named, ``{name}``, the same way in Python and in the viewer's script. Every
key exists in every language with the same parameters (the tests check), so a page never switches
language halfway and a translation cannot lose a desktop's name.

What the API says (problem documents, close frames' reasons, logs) stays English: portals, scripts and
admins' searches rely on those words. Only what a person reads on a page comes from here.
"""

from __future__ import annotations

import contextvars
import json
import re
from collections.abc import Mapping
from pathlib import Path

from markupsafe import Markup, escape

LANGUAGES = ("en", "de")
DEFAULT = "en"
COOKIE = "dg_lang"
COOKIE_MAX_AGE = 365 * 24 * 3600
PARAMETER = re.compile(r"\{([a-z_]+)\}")
# Ranges read from an Accept-Language header: browsers send a handful; a longer header is not a browser.
MAX_RANGES = 32

# The language of the request being served, chosen by the language middleware before anything answers.
current: contextvars.ContextVar[str] = contextvars.ContextVar("language", default=DEFAULT)
# The path (and query) the page being served was asked for, so that its language switch comes back to
# it; a page answering a form comes back to the start page (the form is not sent again).
switch_back: contextvars.ContextVar[str] = contextvars.ContextVar("switch_back", default="/")


class Catalogue:
    """The sentences of every language, by key."""

    def __init__(self, messages: Mapping[str, Mapping[str, str]]) -> None:
        self.messages = messages

    @classmethod
    def load(cls, directory: Path) -> Catalogue:
        return cls({lang: _read(directory / f"{lang}.json") for lang in LANGUAGES})

    def text(self, language: str, key: str, **params: object) -> str:
        """The sentence ``key`` in ``language`` with its ``{name}`` parameters filled in."""
        return PARAMETER.sub(lambda m: str(params[m.group(1)]), self.messages[language][key])

    def plural(self, language: str, key: str, count: int, **params: object) -> str:
        """``key_one`` when ``count`` is one, else ``key_other`` (German and English share that rule)."""
        return self.text(language, f"{key}_{'one' if count == 1 else 'other'}", **params)

    def markup(self, language: str, key: str, **params: object) -> Markup:
        """:meth:`text` for a template: the sentence escaped, parameters escaped unless already markup
        (so a name can be set in bold inside a sentence without the sentence being split)."""
        return escape(self.messages[language][key]).format(**params)

    def section(self, language: str, prefix: str) -> dict[str, str]:
        """The sentences whose keys start with ``prefix`` (without it), as they are: for a page's script."""
        return {k.removeprefix(prefix): v for k, v in self.messages[language].items() if k.startswith(prefix)}

    def from_english(self, language: str, prefix: str) -> dict[str, str]:
        """The sentences under ``prefix`` in ``language``, by their English: for sentences the gateway
        sends in English (close frames' reasons), which a page shows in its reader's language."""
        english = self.messages["en"]
        return {english[k]: v for k, v in self.messages[language].items() if k.startswith(prefix)}


def _read(path: Path) -> dict[str, str]:
    messages = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(messages, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in messages.items()
    ):
        raise ValueError(f"{path} must be one JSON object of sentences by key")
    return messages


CATALOGUE = Catalogue.load(Path(__file__).parent / "locales")


def t(key: str, **params: object) -> str:
    """The sentence ``key`` in the language of the request being served."""
    return CATALOGUE.text(current.get(), key, **params)


def negotiate(accept_language: str | None, cookie: str | None) -> str:
    """The language a browser gets: the one it chose with the switch (the cookie), else the first of its
    Accept-Language preferences the gateway speaks (``de-AT`` is German), else English.

    Pure and total: any header, however malformed, gives a language (a range that cannot be read is
    skipped, never the header).
    """
    if cookie is not None and cookie in LANGUAGES:
        return cookie
    ranges: list[tuple[float, int, str]] = []
    for position, item in enumerate((accept_language or "").split(",")[:MAX_RANGES]):
        tag, _, parameters = item.partition(";")
        quality = _quality(parameters)
        if tag.strip() and quality is not None:
            ranges.append((quality, position, tag.strip().lower()))
    refused = {tag for quality, _, tag in ranges if quality == 0}
    for quality, _, tag in sorted(ranges, key=lambda r: (-r[0], r[1])):
        if quality == 0:
            break
        if tag == "*":
            return next((lang for lang in LANGUAGES if lang not in refused), DEFAULT)
        primary = tag.partition("-")[0]
        if primary in LANGUAGES:
            return primary
    return DEFAULT


def _quality(parameters: str) -> float | None:
    """The ``q`` of a range's parameters (1 when absent), or ``None`` when it is not a valid weight."""
    for parameter in parameters.split(";"):
        name, _, value = parameter.partition("=")
        if name.strip().lower() == "q":
            try:
                quality = float(value.strip())
            except ValueError:
                return None
            return quality if 0 <= quality <= 1 else None
    return 1.0
