"""The OpenAPI 3.1 description of the local HTTP API, served at `/api/v1/openapi.json`.

Written by hand next to the routes (`agent.http`, `agent.http_live`); a test checks that every route is
described here and that every path described answers.
"""

from __future__ import annotations

from typing import Any

from agent import __version__

_ERROR = {"$ref": "#/components/responses/Error"}
_EID = {"name": "eid", "in": "path", "required": True, "schema": {"type": "string"}, "description": "equipment id"}
_ID = {"name": "id", "in": "path", "required": True, "schema": {"type": "integer"}, "description": "dead letter id"}


def _op(summary: str, role: str | None, ok: str, schema: dict[str, Any] | None = None, **more: Any) -> dict[str, Any]:
    """One operation: its summary, the role it needs, its 200 answer and the error answers."""
    content = {"application/json": {"schema": schema or {"type": "object"}}}
    op: dict[str, Any] = {
        "summary": summary,
        "responses": {"200": {"description": ok, "content": content}, "4XX": _ERROR, "5XX": _ERROR},
        **more,
    }
    if role is not None:
        op["security"] = [{"bearer": []}, {"apiKey": []}]
        op["x-role"] = role
    return op


def _html(summary: str) -> dict[str, Any]:
    return {"summary": summary, "responses": {"200": {"description": summary, "content": {"text/*": {}}}}}


ALERT = {
    "type": "object",
    "properties": {
        "alert_id": {"type": "string"},
        "equipment_id": {"type": "string"},
        "tag": {"type": "string"},
        "severity": {"type": "string"},
        "threshold": {"type": "number"},
        "clear_threshold": {"type": "number"},
        "message": {"type": ["string", "null"]},
        "since": {"type": "string", "format": "date-time", "description": "when it was raised (kept across restarts)"},
        "value": {"description": "the tag's current value"},
        "process_id": {"type": ["string", "null"]},
    },
}

PATHS: dict[str, dict[str, Any]] = {
    "/": {"get": _html("The status page (viewer; loopback only while no keys are configured)")},
    "/ui/{name}": {
        "get": {
            **_html("The status page's script and style sheet"),
            "parameters": [
                {"name": "name", "in": "path", "required": True, "schema": {"enum": ["app.js", "style.css"]}}
            ],
        }
    },
    "/healthz": {"get": _op("Health per component and per link; 503 when unhealthy", None, "healthy")},
    "/metrics": {
        "get": {
            "summary": "Prometheus metrics (viewer when [http] metrics_auth is set)",
            "responses": {"200": {"description": "text format", "content": {"text/plain": {}}}},
        }
    },
    "/api/v1/openapi.json": {"get": _op("This description", "viewer", "OpenAPI 3.1")},
    "/api/v1/equipment": {"get": _op("Every equipment's status object with its current values", "viewer", "list")},
    "/api/v1/equipment/{eid}": {
        "get": _op("One equipment's status object with its current values", "viewer", "status", parameters=[_EID])
    },
    "/api/v1/equipment/{eid}/commands/{command}": {
        "post": _op(
            "Run a declared command (the role it declares)",
            "operator",
            "the command's result",
            parameters=[_EID, {"name": "command", "in": "path", "required": True, "schema": {"type": "string"}}],
            requestBody={
                "content": {
                    "application/json": {"schema": {"type": "object", "properties": {"parameters": {"type": "object"}}}}
                }
            },
        )
    },
    "/api/v1/alerts": {
        "get": _op(
            "Active alerts with since and value",
            "viewer",
            "active alerts, oldest first",
            {"type": "object", "properties": {"alerts": {"type": "array", "items": ALERT}}},
        )
    },
    "/api/v1/ws": {
        "get": {
            "summary": "WebSocket: authenticate, subscribe to equipment, quality, alerts, system; {event, data} events",
            "description": (
                "First message {type: auth, key} unless the upgrade carries the key; then {type: subscribe | "
                "unsubscribe, channels: [...]} and {type: ping}. Events: equipmentStatus, telemetry, qualityResult, "
                "qualityAlert, systemAlert, systemHealth. Close codes: 4400 bad message, 4401 authentication, "
                "4408 heartbeat missed, 4429 too fast or too slow, 1001 daemon stopping."
            ),
            "x-role": "viewer",
            "responses": {"101": {"description": "switching to the WebSocket protocol"}, "4XX": _ERROR},
        }
    },
    "/api/v1/dead-letters": {"get": _op("Dead letters of the MPM outbox", "admin", "dead letters")},
    "/api/v1/dead-letters/{id}/retry": {
        "post": _op("Move a dead letter back into the outbox", "admin", "pending again", parameters=[_ID])
    },
    "/api/v1/dead-letters/{id}": {"delete": _op("Delete a dead letter", "admin", "deleted", parameters=[_ID])},
}


def document() -> dict[str, Any]:
    """The whole description."""
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "edge-agent local API",
            "version": __version__,
            "description": "Roles: viewer < operator < admin. Errors use the contract's error object.",
        },
        "paths": PATHS,
        "components": {
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
                "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
            },
            "responses": {
                "Error": {
                    "description": "the contract's error object",
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "properties": {
                                    "error": {
                                        "type": "object",
                                        "required": ["code", "message", "category", "details", "timestamp"],
                                        "properties": {
                                            "code": {"type": "string"},
                                            "message": {"type": "string"},
                                            "category": {"type": "string"},
                                            "details": {"type": "object"},
                                            "timestamp": {"type": "string", "format": "date-time"},
                                            "request_id": {"type": "string"},
                                        },
                                    }
                                },
                            }
                        }
                    },
                }
            },
        },
    }
