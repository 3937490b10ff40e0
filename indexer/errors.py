"""The one hierarchy of domain errors. They say what went wrong (a ``code`` and a message), never how a
surface reports it: the CLI turns them into a clear message and a non-zero exit, the JSON API maps each
to an HTTP status at its edge (``search.edge.http_status``)."""
from __future__ import annotations


class FlagmatchError(Exception):
    """Base of every error flagmatch raises on purpose."""

    code = "error"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else self.code


class DecodeError(FlagmatchError):
    """An image could not be read, or is not one we accept. ``code`` says why:
    empty, unsupported_format, too_large, timeout, truncated, corrupt, unreadable."""

    code = "corrupt"


class ModelLoadError(FlagmatchError):
    code = "model_unavailable"


class ModelMismatchError(FlagmatchError):
    code = "model_mismatch"


class NotFoundError(FlagmatchError):
    code = "not_found"


class InvalidInputError(FlagmatchError):
    code = "invalid"


class NotEnoughVerdicts(FlagmatchError):
    """Too few reviewer verdicts of a label to train or check a head (or fine-tune) on; the message counts them."""

    code = "not_enough_verdicts"


class ClusteringError(FlagmatchError):
    code = "clustering"


class FetchError(FlagmatchError):
    """A URL flagmatch was asked to fetch was refused or could not be read. ``code`` says why: ``fetch_off``
    (no allow-list), ``fetch_invalid`` (not a well-formed http(s) URL), ``fetch_refused`` (not on the list,
    an address the list does not name, a redirect off it), ``fetch_not_media`` (the answer is not an image
    or video), ``fetch_too_large``, ``fetch_timeout``, ``fetch_failed``."""
    code = "fetch_failed"


class OverloadedError(FlagmatchError):
    """The work cannot start now without risking the process (memory in flight); try again later."""

    code = "overloaded"

    def __init__(self, message: str, *, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after
