"""TLS on the internal gRPC calls (gateway -> vision and language servers), mutual when a CA is given.

Servers: `tls_cert_file` + `tls_key_file` serve TLS; with `tls_ca_file` too, only clients holding a
certificate signed by that CA may connect. The gateway: `tls_ca_file` verifies the servers (TLS on),
`tls_cert_file` + `tls_key_file` are its client certificate, `tls_server_name` overrides the name checked
in server certificates (when servers are addressed by IP). Images and prompts cross the network in
these calls; the internal secret authenticates calls but does not encrypt them.
"""

from __future__ import annotations

from pathlib import Path

import grpc
from pydantic import BaseModel, FilePath, model_validator


class TlsFiles(BaseModel):
    """PEM files of one side of the internal calls; every field empty: plaintext."""

    tls_cert_file: FilePath | None = None
    tls_key_file: FilePath | None = None
    tls_ca_file: FilePath | None = None

    @model_validator(mode="after")
    def _cert_with_key(self) -> TlsFiles:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file go together: give both or neither")
        return self


def _read(path: Path | None) -> bytes | None:
    return path.read_bytes() if path is not None else None


def add_port(server: grpc.aio.Server, address: str, files: TlsFiles) -> str:
    """Listen on `address`, with TLS when the server has a certificate; returns "tls", "mtls" or "plaintext"."""
    if files.tls_cert_file is None:
        server.add_insecure_port(address)
        return "plaintext"
    credentials = grpc.ssl_server_credentials(
        [(_read(files.tls_key_file), _read(files.tls_cert_file))], root_certificates=_read(files.tls_ca_file),
        require_client_auth=files.tls_ca_file is not None)
    server.add_secure_port(address, credentials)
    return "mtls" if files.tls_ca_file is not None else "tls"


def channel_credentials(files: TlsFiles) -> grpc.ChannelCredentials | None:
    """Client side: None (plaintext) unless a CA to verify the servers is given."""
    if files.tls_ca_file is None:
        return None
    return grpc.ssl_channel_credentials(root_certificates=_read(files.tls_ca_file),
                                        private_key=_read(files.tls_key_file),
                                        certificate_chain=_read(files.tls_cert_file))
