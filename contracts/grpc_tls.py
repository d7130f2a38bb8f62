"""TLS on the internal gRPC calls (gateway -> vision and language servers), mutual when a CA is given.

Servers: `tls_cert_file` + `tls_key_file` serve TLS; with `tls_ca_file` too, only clients holding a
certificate signed by that CA may connect. The gateway: `tls_ca_file` verifies the servers (TLS on),
`tls_cert_file` + `tls_key_file` are its client certificate, `tls_server_name` overrides the name checked
in server certificates (when servers are addressed by IP). Images and prompts cross the network in
these calls; the internal secret authenticates calls but does not encrypt them.

Rotated files are picked up without a restart (cert-manager renews certificates in place): a server
reads them again before the next handshake after they change, the gateway rebuilds its channels at its
next health check. Files that do not load, or a certificate that does not match its key (a rotation
caught half-written), keep the previous ones in use until a later change loads.
"""

from __future__ import annotations

import logging
import ssl

import grpc
from pydantic import BaseModel, FilePath, model_validator

log = logging.getLogger(__name__)


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

    def stamp(self) -> tuple:
        """Changes when any of the files changes (Kubernetes swaps a Secret's files by a symlink, followed here)."""
        stamps = []
        for path in (self.tls_cert_file, self.tls_key_file, self.tls_ca_file):
            try:
                stat = path.stat() if path is not None else None
            except OSError:
                stat = None  # missing mid-rotation: a later stamp differs and is tried again
            stamps.append((stat.st_mtime_ns, stat.st_size, stat.st_ino) if stat else None)
        return tuple(stamps)

    def read(self) -> tuple[bytes | None, bytes | None, bytes | None]:
        """(certificate, key, CA) PEM bytes; raises ValueError unless the certificate and key belong together."""
        cert, key, ca = (path.read_bytes() if path is not None else None
                         for path in (self.tls_cert_file, self.tls_key_file, self.tls_ca_file))
        if cert is not None:
            try:
                ssl.create_default_context().load_cert_chain(self.tls_cert_file, self.tls_key_file)
            except ssl.SSLError as exc:
                raise ValueError(f"{self.tls_cert_file} does not go with {self.tls_key_file}: {exc}") from None
        return cert, key, ca


class _ServerFiles:
    """gRPC's certificate fetcher: called before every new handshake, it reloads the files once they change."""

    def __init__(self, files: TlsFiles):
        self.files = files
        self.stamp = files.stamp()
        self.initial = self._configuration()

    def _configuration(self) -> grpc.ServerCertificateConfiguration:
        cert, key, ca = self.files.read()
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)

    def __call__(self) -> grpc.ServerCertificateConfiguration | None:
        stamp = self.files.stamp()
        if stamp == self.stamp:
            return None
        self.stamp = stamp
        try:
            configuration = self._configuration()
        except (OSError, ValueError) as exc:
            log.warning("TLS files changed but did not load, the previous ones stay in use: %s", exc)
            return None
        log.info("TLS certificate reloaded from %s", self.files.tls_cert_file)
        return configuration


def add_port(server: grpc.aio.Server, address: str, files: TlsFiles) -> str:
    """Listen on `address`, with TLS when the server has a certificate; returns "tls", "mtls" or "plaintext"."""
    if files.tls_cert_file is None:
        server.add_insecure_port(address)
        return "plaintext"
    fetcher = _ServerFiles(files)
    credentials = grpc.dynamic_ssl_server_credentials(fetcher.initial, fetcher,
                                                      require_client_authentication=files.tls_ca_file is not None)
    server.add_secure_port(address, credentials)
    return "mtls" if files.tls_ca_file is not None else "tls"


def channel_credentials(files: TlsFiles) -> grpc.ChannelCredentials | None:
    """Client side: None (plaintext) unless a CA to verify the servers is given."""
    if files.tls_ca_file is None:
        return None
    cert, key, ca = files.read()
    return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)
