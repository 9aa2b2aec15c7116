"""Discord's error bodies, so clients see exactly what the real API would send.

discord.py turns these bodies into ``HTTPException.code`` / ``.text``; bots branch on the
numeric codes (10062, 40060, 50027 ...), so the sandbox must use the same numbers and shapes.
"""

from __future__ import annotations

from typing import Any


class SandboxError(Exception):
    """A mistake in how a test drives the sandbox (not an API error seen by the bot)."""


class InvocationError(SandboxError, ValueError):
    """A slash command / click that a real Discord client would not let the user send."""


class ApiError(Exception):
    """An HTTP error response in Discord's JSON format ``{"message", "code", "errors"?}``."""

    def __init__(
        self, status: int, code: int, message: str, errors: dict[str, Any] | None = None, **extra: Any
    ) -> None:
        super().__init__(f"{status} {code} {message}")
        self.status = status
        self.code = code
        self.message = message
        self.errors = errors
        self.extra = extra

    def body(self) -> dict[str, Any]:
        out: dict[str, Any] = {"message": self.message, "code": self.code}
        if self.errors:
            out["errors"] = self.errors
        out.update(self.extra)
        return out


def field_error(path: str, code: str, message: str) -> dict[str, Any]:
    """Nested ``errors`` object for one bad field, e.g. ``embeds.0.description``."""
    node: dict[str, Any] = {"_errors": [{"code": code, "message": message}]}
    for part in reversed(path.split(".")):
        node = {part: node}
    return node


def invalid_form(path: str, code: str, message: str) -> ApiError:
    """400 / 50035, the catch-all validation error Discord returns for bad payload fields."""
    return ApiError(400, 50035, "Invalid Form Body", field_error(path, code, message))


def too_long(path: str, limit: int) -> ApiError:
    return invalid_form(path, "BASE_TYPE_MAX_LENGTH", f"Must be {limit} or fewer in length.")


def unauthorized() -> ApiError:
    return ApiError(401, 0, "401: Unauthorized")


def not_found_route() -> ApiError:
    return ApiError(404, 0, "404: Not Found")


def unknown_channel() -> ApiError:
    return ApiError(404, 10003, "Unknown Channel")


def unknown_guild() -> ApiError:
    return ApiError(404, 10004, "Unknown Guild")


def unknown_member() -> ApiError:
    return ApiError(404, 10007, "Unknown Member")


def unknown_message() -> ApiError:
    return ApiError(404, 10008, "Unknown Message")


def unknown_user() -> ApiError:
    return ApiError(404, 10013, "Unknown User")


def unknown_webhook() -> ApiError:
    return ApiError(404, 10015, "Unknown Webhook")


def unknown_command() -> ApiError:
    return ApiError(404, 10063, "Unknown application command")


def unknown_interaction() -> ApiError:
    return ApiError(404, 10062, "Unknown interaction")


def already_acknowledged() -> ApiError:
    return ApiError(400, 40060, "Interaction has already been acknowledged.")


def invalid_webhook_token() -> ApiError:
    return ApiError(401, 50027, "Invalid Webhook Token")


def missing_permissions() -> ApiError:
    return ApiError(403, 50013, "Missing Permissions")


def missing_access() -> ApiError:
    return ApiError(403, 50001, "Missing Access")


def cannot_edit_others() -> ApiError:
    return ApiError(403, 50005, "Cannot edit a message authored by another user")


def empty_message() -> ApiError:
    return ApiError(400, 50006, "Cannot send an empty message")


def entity_too_large() -> ApiError:
    return ApiError(413, 40005, "Request entity too large")


def invalid_json() -> ApiError:
    return ApiError(400, 50109, "The request body contains invalid JSON.")
