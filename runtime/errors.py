"""Errors as values the server can map to an HTTP status and an OpenAI error body.

Each stage raises the subclass that says what went wrong; `status`, `type` and `code` follow OpenAI's error object
(`{"error": {"message", "type", "param", "code"}}`).
"""

from __future__ import annotations


MAX_MESSAGE = 1000


class EdgeVLMError(Exception):
    """Base class: a message for the user, plus what an HTTP layer needs to report it."""

    status = 500
    type = "server_error"
    code: str | None = None

    headers: dict[str, str] = {}  # extra HTTP headers for the response (Retry-After)

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        if len(message) > MAX_MESSAGE:  # messages quote what the client sent: never echo megabytes back
            message = message[:MAX_MESSAGE] + "…"
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code

    def to_dict(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class InvalidRequestError(EdgeVLMError):
    """The client sent something we cannot use (bad parameter, bad image, prompt too long)."""

    status = 400
    type = "invalid_request_error"


class ImageError(InvalidRequestError):
    """An image could not be decoded or breaks a limit; the message names the image ("image 2: ...")."""

    code = "invalid_image"


class ContextLengthError(InvalidRequestError):
    code = "context_length_exceeded"


class PackageError(EdgeVLMError):
    """A model package is missing, incomplete, corrupted, or not one this runtime can run."""

    type = "package_error"
    code = "invalid_model_package"


class Cancelled(EdgeVLMError):
    """The work stopped before it was done: the client went away or the server is shutting down."""

    status = 503
    code = "cancelled"
