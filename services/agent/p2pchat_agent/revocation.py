"""Whether a peer's certificate is still good: asked of the directory before a link is trusted
and again while it is open, so that a logout or a new key closes links within a bounded delay.

Answers are kept for `interval` seconds. When the directory cannot be asked, links go on (a
message must reach a peer while the directory is down); the certificate's own short lifetime
(hours) then bounds how long a revoked one can still be used.
"""

from __future__ import annotations

import asyncio
import logging

from p2pchat.v1 import directory_pb2 as dpb
from p2pchat_agent.directory_client import DirectoryClient
from p2pchat_common.errors import DomainError, PermissionDenied

log = logging.getLogger(__name__)

MAX_PER_CALL = 256


class RevocationChecker:
    def __init__(self, directory: DirectoryClient, interval: float) -> None:
        self._directory = directory
        self.interval = interval
        self._good: dict[str, float] = {}  # certificate SHA-256 -> loop time it was found good

    async def require_good(self, peer: str, cert_sha256: str) -> None:
        """PermissionDenied when the directory says the certificate is revoked or unknown."""
        loop = asyncio.get_running_loop()
        checked = self._good.get(cert_sha256)
        if checked is not None and loop.time() - checked < self.interval:
            return
        bad = await self.revoked_among([cert_sha256])
        if bad:
            raise PermissionDenied(
                f"{peer}'s certificate is revoked (logged out, or replaced by a new key)"
            )

    async def revoked_among(self, sha256s: list[str]) -> set[str]:
        """Those of `sha256s` the directory no longer vouches for; none when it cannot be asked."""
        loop = asyncio.get_running_loop()
        bad: set[str] = set()
        for start in range(0, len(sha256s), MAX_PER_CALL):
            chunk = sha256s[start : start + MAX_PER_CALL]
            try:
                states = await self._directory.certificate_status(chunk)
            except DomainError as exc:
                log.info("cannot check peer certificates now (%s); links go on", exc)
                return bad
            if len(states) != len(chunk):
                log.warning("the directory answered %d states for %d", len(states), len(chunk))
                return bad
            now = loop.time()
            self._forget_older_than(now - 10 * self.interval)
            for sha, state in zip(chunk, states, strict=True):
                if state == dpb.CERTIFICATE_STATE_GOOD:
                    self._good[sha] = now
                else:
                    self._good.pop(sha, None)
                    bad.add(sha)
        return bad

    def _forget_older_than(self, moment: float) -> None:
        for sha in [sha for sha, at in self._good.items() if at < moment]:
            del self._good[sha]
