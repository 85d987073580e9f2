"""Message ids made by the sender: ULIDs (a 48-bit millisecond timestamp and 80 random bits in
26 characters of Crockford base32), monotonic within the process so that an id made later in one
process always sorts after an earlier one, by plain string comparison."""

from __future__ import annotations

import re
import secrets
import threading
import time

MAX_ID_LEN = 64

_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"  # Crockford base32: no I, L, O, U
_RANDOM_BITS = 80
_RANDOM_MAX = (1 << _RANDOM_BITS) - 1
_TIME_MAX = (1 << 48) - 1
_VALID = re.compile(r"[0-9A-Za-z_-]+")

_lock = threading.Lock()
_last_ms = -1
_last_random = 0


def _encode(value: int) -> str:
    """The 128-bit value as 26 base32 characters, most significant first (so order is kept)."""
    chars = []
    for _ in range(26):
        chars.append(_ALPHABET[value & 31])
        value >>= 5
    return "".join(reversed(chars))


def new_message_id() -> str:
    """A new ULID, greater than every id this process made before (thread-safe).

    Within one millisecond, or if the clock steps back, the previous id's random part is incremented
    instead of drawn anew; should it overflow, the timestamp moves one millisecond ahead.
    """
    global _last_ms, _last_random
    with _lock:
        now_ms = time.time_ns() // 1_000_000
        if now_ms > _last_ms:
            _last_ms, _last_random = now_ms, secrets.randbits(_RANDOM_BITS)
        elif _last_random < _RANDOM_MAX:
            _last_random += 1
        else:
            _last_ms, _last_random = _last_ms + 1, secrets.randbits(_RANDOM_BITS)
        if _last_ms > _TIME_MAX:
            raise OverflowError("the clock is past the ULID range (year 10889)")
        return _encode((_last_ms << _RANDOM_BITS) | _last_random)


def valid_message_id(value: str) -> bool:
    """1 to MAX_ID_LEN ASCII letters, digits, '_' or '-': any sender's id, not only a ULID."""
    return 0 < len(value) <= MAX_ID_LEN and _VALID.fullmatch(value) is not None
