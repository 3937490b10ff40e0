"""Bearer tokens from settings (``name:token`` or a bare token), compared in constant time."""
from __future__ import annotations

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

    @staticmethod
    def from_header(value: str | None) -> str | None:
        if not value:
            return None
        scheme, _, rest = value.partition(" ")
        return rest.strip() if scheme.lower() == "bearer" and rest.strip() else None


def session_actor() -> str | None:
    """The viewer's signed-in moderator, when the request carries its session cookie."""
    from flask import session
    try:
        return session.get("actor")
    except RuntimeError:  # outside a request
        return None


def csrf_ok(token: str | None) -> bool:
    """Whether ``token`` is the session's CSRF token (constant-time)."""
    from flask import session
    expected = session.get("csrf")
    return bool(token and expected and hmac.compare_digest(str(token).encode(), str(expected).encode()))
