"""Password hashing with scrypt (memory-hard), a random salt per password.

Stored form: ``scrypt$<log2 n>$<r>$<p>$<salt b64>$<hash b64>``; the parameters travel with the
hash so they can be raised later without invalidating old passwords.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets

LOG2_N = 15  # n = 32768, r = 8: 32 MiB of memory per hash
R = 8
P = 1
_SALT_BYTES = 16
_HASH_BYTES = 32


def _scrypt(password: str, salt: bytes, log2_n: int, r: int, p: int) -> bytes:
    n = 1 << log2_n
    return hashlib.scrypt(
        password.encode("utf-8"),
        salt=salt,
        n=n,
        r=r,
        p=p,
        maxmem=256 * n * r,
        dklen=_HASH_BYTES,
    )


def hash_password(password: str) -> str:
    salt = secrets.token_bytes(_SALT_BYTES)
    digest = _scrypt(password, salt, LOG2_N, R, P)
    b64 = base64.b64encode
    return f"scrypt${LOG2_N}${R}${P}${b64(salt).decode()}${b64(digest).decode()}"


def verify_password(password: str, stored: str) -> bool:
    try:
        scheme, log2_n_text, r_text, p_text, salt, digest = stored.split("$")
        log2_n, r, p = int(log2_n_text), int(r_text), int(p_text)
        # A corrupt row must not make scrypt allocate without bound or crash the login.
        if scheme != "scrypt" or not (1 <= log2_n <= 20 and 1 <= r <= 32 and 1 <= p <= 16):
            return False
        expected = base64.b64decode(digest)
        actual = _scrypt(password, base64.b64decode(salt), log2_n, r, p)
    except ValueError:
        return False
    return hmac.compare_digest(actual, expected)


# Verified against when the user does not exist, so that an unknown name costs the same time.
DUMMY_HASH = hash_password(secrets.token_urlsafe(16))
