"""Shared-secret authentication of feature connections with ZeroMQ CURVE.

Both ends derive the same two CURVE key pairs (receiver's and sender's) from one configured secret, so
an operator distributes a single string. The receiver encrypts with its pair and, through a ZAP handler,
admits only senders that present the derived sender key: a peer without the secret cannot finish the
handshake, and nothing it sends is ever delivered.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import zmq
import zmq.auth.asyncio
import zmq.utils.z85

MIN_SECRET_LENGTH = 16


@dataclass(frozen=True)
class CurveKeys:
    """A CURVE key pair, Z85-encoded as ZeroMQ's socket options take them."""

    public: bytes
    secret: bytes


def derive_keys(secret: str, role: str) -> CurveKeys:
    """The key pair of `role` ("receiver" or "sender") for this shared secret."""
    if len(secret) < MIN_SECRET_LENGTH:
        raise ValueError(f"the feature secret must be at least {MIN_SECRET_LENGTH} characters, got {len(secret)}")
    seed = hashlib.sha256(f"dvd-feature-transport/{role}/".encode() + secret.encode()).digest()
    secret_z85 = zmq.utils.z85.encode(seed)
    return CurveKeys(public=zmq.curve_public(secret_z85), secret=secret_z85)


def secure_sender_socket(sock: zmq.Socket, secret: str) -> None:
    """Make `sock` (before it connects) a CURVE client holding the sender's derived keys."""
    client, server = derive_keys(secret, "sender"), derive_keys(secret, "receiver")
    sock.curve_publickey = client.public
    sock.curve_secretkey = client.secret
    sock.curve_serverkey = server.public


class _SenderKeyOnly:
    """ZAP credentials check: exactly the sender key derived from the secret."""

    def __init__(self, allowed: bytes):
        self._allowed = allowed

    def callback(self, domain: str, key: bytes) -> bool:
        return key == self._allowed


def secure_receiver_socket(
    sock: zmq.Socket, context: zmq.Context, secret: str
) -> zmq.auth.asyncio.AsyncioAuthenticator:
    """Make `sock` (before it binds) a CURVE server that admits only the derived sender key.

    Returns the running ZAP authenticator; the caller stops it when closing. Needs a running event loop.
    """
    authenticator = zmq.auth.asyncio.AsyncioAuthenticator(context)
    authenticator.start()
    authenticator.configure_curve_callback("*", _SenderKeyOnly(derive_keys(secret, "sender").public))
    keys = derive_keys(secret, "receiver")
    sock.curve_server = True
    sock.curve_secretkey = keys.secret
    sock.curve_publickey = keys.public
    return authenticator
