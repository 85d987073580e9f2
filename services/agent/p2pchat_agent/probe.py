"""Reading the certificate a peer presents before linking: a TLS probe of its address, with
our certificate and only our CA trusted, so that the key can be compared with the pinned one
and asked about at the directory before any gRPC call."""

from __future__ import annotations

import functools
import socket
import ssl
import tempfile
from pathlib import Path

from cryptography import x509

from p2pchat_agent.identity import Identity, load_certificate
from p2pchat_common.errors import Unauthenticated, Unavailable
from p2pchat_common.tls import user_dns_name, user_identity
from p2pchat_common.validation import parse_address


@functools.lru_cache(maxsize=2)  # the identity in use, and the one before a renewal
def _probe_context(identity: Identity) -> ssl.SSLContext:
    """A client TLS context with our certificate, trusting only our CA: made once per identity
    (ssl loads a key only from a file), not on every dial and retry."""
    ctx = ssl.create_default_context(cadata=identity.ca_pem.decode())
    ctx.set_alpn_protocols(["h2"])
    with tempfile.TemporaryDirectory() as tmp:
        cert, key = Path(tmp, "cert.pem"), Path(tmp, "key.pem")
        cert.write_bytes(identity.cert_pem)
        key.write_bytes(identity.key_pem)
        ctx.load_cert_chain(cert, key)
    return ctx


def probe_peer_certificate(
    address: str, peer: str, identity: Identity, timeout: float
) -> x509.Certificate:
    """The DER certificate the agent at `address` presents, verified to chain to our CA and to
    name `peer` (blocking). Used to compare the real key with the pinned one before linking."""
    target = parse_address(address)
    ctx = _probe_context(identity)
    with socket.create_connection((target.host, target.port), timeout=timeout) as raw:
        with ctx.wrap_socket(raw, server_hostname=user_dns_name(peer)) as tls:
            der = tls.getpeercert(binary_form=True)
    if der is None:
        raise Unavailable(f"{peer} at {address} presented no certificate")
    cert = load_certificate(der)
    if peer_identity(cert) != peer:
        raise Unauthenticated(f"the agent at {address} does not present {peer}'s certificate")
    return cert


def peer_identity(cert: x509.Certificate) -> str | None:
    """The user a verified peer certificate names (its URI SAN), or None."""
    found = user_identity(cert)
    return None if found is None else found[0]
