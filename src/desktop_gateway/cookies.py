"""Reading a request's Cookie header the way browsers write it.

Python's ``http.cookies`` gives up on the whole header at the first cookie it cannot parse (JSON such as
``prefs={"a":1}``, values with spaces, non-ASCII), and other apps on the school's domain set such cookies:
the session cookie beside them would be lost and the student would look signed out. Browsers send
``name=value`` pairs separated by ``;`` (RFC 6265, section 5.4), so that is all that is read here, and a
pair that makes no sense is skipped, never the header.
"""

from __future__ import annotations


def parse_cookie_header(header: str) -> dict[str, str]:
    """Every ``name=value`` pair in ``header``; for a repeated name the first wins (the most specific)."""
    cookies: dict[str, str] = {}
    for pair in header.split(";"):
        name, sep, value = pair.partition("=")
        name = name.strip()
        if not sep or not name:
            continue
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] == '"':
            value = value[1:-1]
        cookies.setdefault(name, value)
    return cookies
