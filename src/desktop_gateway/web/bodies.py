"""Request bodies: the JSON API's (size-limited, typed, every refusal a problem document) and the
pages' small forms."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import parse_qs

from starlette.requests import Request
from starlette.responses import Response

from desktop_gateway.web.problems import problem

MAX_BODY = 16 * 1024
# The pages' forms carry a name, a language or a path back: a few hundred bytes at most.
MAX_FORM = 4096


async def read_json(request: Request) -> dict[str, Any] | Response:
    if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
        return problem(415, "Unsupported media type", "send the body as application/json")
    too_large = problem(413, "Body too large", f"the body may be at most {MAX_BODY} bytes")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY:
        return too_large
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY:
            return too_large
    try:
        data = json.loads(body)
    except ValueError:
        return problem(400, "Malformed JSON", "the body is not valid JSON")
    except RecursionError:  # a few kilobytes of brackets nest deeper than Python's parser recurses
        return problem(400, "Malformed JSON", "the body nests arrays or objects too deeply")
    if not isinstance(data, dict):
        return problem(400, "Malformed request", "the body must be a JSON object")
    return data


async def read_form(request: Request) -> dict[str, str] | None:
    """A page's url-encoded form, each field's first value; None when it is longer than ``MAX_FORM``
    (read no further: the caller answers 413 in the page's words)."""
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM:
            return None
    return {k: v[0] for k, v in parse_qs(body.decode("utf-8", "replace")).items()}
