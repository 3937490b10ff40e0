"""The one hierarchy of domain errors. The CLI turns them into a clear message and a non-zero exit,
the JSON API into a 4xx with ``{"error": {"code", "message"}}``."""
from __future__ import annotations


class FlagmatchError(Exception):
    """Base of every error flagmatch raises on purpose."""

    code = "error"
    http_status = 400

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else self.code


class DecodeError(FlagmatchError):
    """An image could not be read, or is not one we accept. ``code`` says why:
    empty, unsupported_format, too_large, truncated, corrupt, unreadable."""

    code = "corrupt"
    http_status = 400


class ModelLoadError(FlagmatchError):
    code = "model_unavailable"
    http_status = 503


class ModelMismatchError(FlagmatchError):
    code = "model_mismatch"
    http_status = 409


class NotFoundError(FlagmatchError):
    code = "not_found"
    http_status = 404


class InvalidInputError(FlagmatchError):
    code = "invalid"
    http_status = 400


class ClusteringError(FlagmatchError):
    code = "clustering"
    http_status = 409
