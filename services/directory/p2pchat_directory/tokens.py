"""Session tokens: random bearer tokens, kept in the database only as their SHA-256."""

from __future__ import annotations

import hashlib

from p2pchat_common.errors import Unauthenticated

TOKEN_MAX = 256
SESSION_ENDED = "session expired or revoked: log in again"


def token_hash(token: str) -> str:
    """The SHA-256 (hex) a bearer secret is kept as: a session token, an invite code."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def checked_token_hash(token: str) -> str:
    """The hash of a bearer token to look up; Unauthenticated when it is missing or malformed."""
    if not token:
        raise Unauthenticated("missing session token: log in first")
    if len(token) > TOKEN_MAX:
        raise Unauthenticated("malformed session token")
    return token_hash(token)


def owner(found: str | None) -> str:
    """The owner a session lookup found; Unauthenticated when none."""
    if found is None:
        raise Unauthenticated(SESSION_ENDED)
    return found
