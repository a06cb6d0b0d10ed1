"""Request bodies of the JSON API: size-limited, typed, and every refusal a problem document."""

from __future__ import annotations

import json
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from desktop_gateway.web.problems import problem

MAX_BODY = 16 * 1024


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
