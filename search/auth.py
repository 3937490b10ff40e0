"""Bearer tokens from settings (``name:token`` or a bare token), compared in constant time."""
from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass


@dataclass(frozen=True)
class TokenSet:
    tokens: tuple[tuple[str, bytes], ...]  # (actor name, token bytes)

    @classmethod
    def parse(cls, specs: tuple[str, ...]) -> "TokenSet":
        out = []
        for i, spec in enumerate(specs, 1):
            name, sep, token = spec.partition(":")
            if not sep:
                name, token = f"token-{i}", spec
            if not token:
                raise ValueError(f"api_tokens entry {i} has an empty token")
            out.append((name.strip() or f"token-{i}", token.strip().encode("utf-8")))
        return cls(tuple(out))

    def actor(self, presented: str | None) -> str | None:
        """The name of the token presented, or None. Every configured token is compared, so the time
        taken does not tell which one (or how much of one) matched."""
        if not presented:
            return None
        try:
            given = presented.encode("ascii")
        except UnicodeEncodeError:
            return None
        found = None
        for name, token in self.tokens:
            if hmac.compare_digest(given, token):
                found = name
        return found

    def match(self, presented: str | None) -> tuple[str, str] | None:
        """(actor name, token fingerprint) for a valid token, else None."""
        name = self.actor(presented)
        if name is None or presented is None:
            return None
        return name, fingerprint(presented.encode("ascii"))

    def fingerprints(self) -> set[str]:
        """The fingerprints of the configured tokens (sessions opened with another one are over)."""
        return {fingerprint(token) for _, token in self.tokens}

    @staticmethod
    def from_header(value: str | None) -> str | None:
        if not value:
            return None
        scheme, _, rest = value.partition(" ")
        return rest.strip() if scheme.lower() == "bearer" and rest.strip() else None


def fingerprint(token: bytes) -> str:
    return hashlib.sha256(b"flagmatch-token:" + token).hexdigest()


def session_actor() -> str | None:
    """The viewer's signed-in moderator for this request (set by the app from the server-side session
    store before the request is handled), or None."""
    from flask import g
    try:
        return g.get("session_actor")
    except RuntimeError:  # outside a request
        return None


def csrf_ok(token: str | None) -> bool:
    """Whether ``token`` is the session's CSRF token (constant-time)."""
    from flask import session
    expected = session.get("csrf")
    return bool(token and expected and hmac.compare_digest(str(token).encode(), str(expected).encode()))
