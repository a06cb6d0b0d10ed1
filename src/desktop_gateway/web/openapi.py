"""The OpenAPI document of the portal API, served at ``/api/v1/openapi.json``.

Each operation names the key scope it needs in its ``security`` requirement (OpenAPI 3.1 lets any scheme
list role names there), so a portal developer sees which key a call takes without reading the code.
"""

from __future__ import annotations

from typing import Any

from desktop_gateway import __version__

_PROBLEM = {"$ref": "#/components/responses/Problem"}
_ADMIN = [{"apiKey": ["admin"]}, {"adminSession": []}]
_ID = [{"name": "desktop_id", "in": "path", "required": True, "schema": {"type": "string"}}]


def _needs(scope: str) -> list[dict[str, list[str]]]:
    return [{"apiKey": [scope]}]


def _json_response(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": {"type": "object"}}}}


def _desktop_response(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Desktop"}}},
    }


OPENAPI: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {
        "title": "desktop-gateway portal API",
        "version": __version__,
        "description": "Start, list, stop and launch desktops. Errors are RFC 9457 problem documents.",
    },
    "security": [{"apiKey": []}],
    "paths": {
        "/api/v1/desktops": {
            "post": {
                "security": _needs("desktops:write"),
                "summary": "Start a user's desktop of a type (idempotent: same user and type, same desktop)",
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "required": ["user", "desktop_type"],
                                "properties": {
                                    "user": {"type": "string", "example": "anna-schmidt"},
                                    "desktop_type": {"type": "string", "example": "ubuntu-vscode"},
                                },
                            }
                        }
                    },
                },
                "responses": {
                    "200": _desktop_response("Already running"),
                    "202": _desktop_response("Starting"),
                    "400": _PROBLEM,
                    "401": _PROBLEM,
                    "403": _PROBLEM,
                    "415": _PROBLEM,
                    "422": _PROBLEM,
                    "429": _PROBLEM,
                    "503": _PROBLEM,
                },
            },
            "get": {
                "security": _needs("desktops:read"),
                "summary": "List desktops, optionally of one user",
                "parameters": [
                    {"name": "user", "in": "query", "required": False, "schema": {"type": "string"}}
                ],
                "responses": {
                    "200": {
                        "description": "Desktops",
                        "content": {
                            "application/json": {
                                "schema": {
                                    "type": "object",
                                    "properties": {
                                        "desktops": {
                                            "type": "array",
                                            "items": {"$ref": "#/components/schemas/Desktop"},
                                        }
                                    },
                                }
                            }
                        },
                    },
                    "401": _PROBLEM,
                    "403": _PROBLEM,
                    "422": _PROBLEM,
                },
            },
        },
        "/api/v1/desktops/{desktop_id}": {
            "parameters": _ID,
            "get": {
                "security": _needs("desktops:read"),
                "summary": "One desktop",
                "responses": {
                    "200": _desktop_response("The desktop"),
                    "401": _PROBLEM,
                    "403": _PROBLEM,
                    "404": _PROBLEM,
                },
            },
            "delete": {
                "security": _needs("desktops:write"),
                "summary": "Stop a desktop; connected browsers are closed with 1001",
                "responses": {
                    "200": _desktop_response("Stopped"),
                    "401": _PROBLEM,
                    "403": _PROBLEM,
                    "404": _PROBLEM,
                    "503": _PROBLEM,
                },
            },
        },
        "/api/v1/desktops/{desktop_id}/launch": {
            "parameters": _ID,
            "post": {
                "security": _needs("desktops:write"),
                "summary": "A fresh single-use launch URL (valid 60 seconds) for the desktop's user",
                "responses": {
                    "200": _desktop_response("The desktop, with launch_url"),
                    "401": _PROBLEM,
                    "403": _PROBLEM,
                    "404": _PROBLEM,
                },
            },
        },
        "/api/v1/desktops/{desktop_id}/events": {
            "parameters": _ID,
            "get": {
                "security": _needs("desktops:read"),
                "summary": "Progress as server-sent events; the stream ends once the desktop is running, "
                "failed or stopped",
                "responses": {
                    "200": {
                        "description": "Events named by their step, each with JSON data: step, message, "
                        "state, at",
                        "content": {"text/event-stream": {"schema": {"type": "string"}}},
                    },
                    "401": _PROBLEM,
                    "403": _PROBLEM,
                    "404": _PROBLEM,
                },
            },
        },
        "/api/v1/desktop-types": {
            "get": {
                "security": _needs("desktops:read"),
                "summary": "The configured desktop types; with ?user=NAME only those that person may use",
                "parameters": [
                    {"name": "user", "in": "query", "required": False, "schema": {"type": "string"}}
                ],
                "responses": {
                    "200": _json_response("Desktop types: name, title, allowed_roles, allowed_groups"),
                    "401": _PROBLEM,
                    "403": _PROBLEM,
                    "422": _PROBLEM,
                },
            },
        },
        "/api/v1/users": {
            "get": {
                "security": _ADMIN,
                "summary": "Everyone known: role (and where it comes from), groups, last sign-in, blocked",
                "responses": {"200": _json_response("Users"), "401": _PROBLEM, "403": _PROBLEM},
            },
        },
        "/api/v1/users/{user_id}": {
            "parameters": [
                {"name": "user_id", "in": "path", "required": True, "schema": {"type": "integer"}}
            ],
            "patch": {
                "security": _ADMIN,
                "summary": "Override a user's role (kept across sign-ins; null clears it) and/or block them "
                "(signed out at once, desktops connections closed with 1008)",
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "properties": {
                                    "role_override": {"enum": ["admin", "teacher", "student", None]},
                                    "blocked": {"type": "boolean"},
                                },
                            }
                        }
                    },
                },
                "responses": {
                    "200": _json_response("The user"),
                    "401": _PROBLEM,
                    "403": _PROBLEM,
                    "404": _PROBLEM,
                    "422": _PROBLEM,
                },
            },
        },
        "/api/v1/grants": {
            "get": {
                "security": _ADMIN,
                "summary": "Desktop types given to groups or single users at runtime",
                "responses": {"200": _json_response("Grants"), "401": _PROBLEM, "403": _PROBLEM},
            },
            "post": {
                "security": _ADMIN,
                "summary": "Give a desktop type to a group (its short name) or to one user",
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "required": ["desktop_type"],
                                "properties": {
                                    "desktop_type": {"type": "string"},
                                    "group": {"type": "string", "example": "7a"},
                                    "user": {"type": "string", "example": "kate.meyer"},
                                },
                            }
                        }
                    },
                },
                "responses": {
                    "201": _json_response("The grant"),
                    "401": _PROBLEM,
                    "403": _PROBLEM,
                    "404": _PROBLEM,
                    "422": _PROBLEM,
                },
            },
        },
        "/api/v1/grants/{grant_id}": {
            "parameters": [
                {"name": "grant_id", "in": "path", "required": True, "schema": {"type": "integer"}}
            ],
            "delete": {
                "security": _ADMIN,
                "summary": "Take a grant back",
                "responses": {
                    "200": _json_response("The removed grant"),
                    "401": _PROBLEM,
                    "403": _PROBLEM,
                    "404": _PROBLEM,
                },
            },
        },
    },
    "components": {
        "securitySchemes": {
            "apiKey": {
                "type": "http",
                "scheme": "bearer",
                "description": "A key from `desktop-gateway api-key create NAME [--scope SCOPE ...]`. "
                "Scopes: desktops:read (list desktops, read one, follow its events), desktops:write "
                "(start, stop, launch), admin (administration); none implies another. A key without an "
                "operation's scope gets 403.",
            },
            "adminSession": {
                "type": "apiKey",
                "in": "cookie",
                "name": "dg_session",
                "description": "A browser signed in as an admin (the cookie is __Host-dg_session behind "
                "https). Its state changes must carry the gateway's own Origin.",
            },
        },
        "schemas": {
            "Desktop": {
                "type": "object",
                "required": ["id", "name", "user", "desktop_type", "state"],
                "properties": {
                    "id": {"type": "string"},
                    "name": {"type": "string", "example": "anna-schmidt-ubuntu-vscode"},
                    "user": {"type": "string"},
                    "desktop_type": {"type": "string"},
                    "state": {
                        "type": "string",
                        "enum": ["starting", "running", "stopping", "stopped", "failed"],
                    },
                    "created_at": {"type": "string", "format": "date-time"},
                    "started_at": {"type": ["string", "null"], "format": "date-time"},
                    "failure_reason": {"type": ["string", "null"]},
                    "launch_url": {"type": "string", "format": "uri"},
                },
            },
            "Problem": {
                "type": "object",
                "properties": {
                    "type": {"type": "string"},
                    "title": {"type": "string"},
                    "status": {"type": "integer"},
                    "detail": {"type": "string"},
                },
            },
        },
        "responses": {
            "Problem": {
                "description": "An RFC 9457 problem document",
                "content": {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}},
            }
        },
    },
}
