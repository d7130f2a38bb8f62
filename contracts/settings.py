"""Settings pieces every server declares alike; each server's settings class inherits them under its own
environment prefix (`DVD_VISION_INTERNAL_SECRET`, `DVD_LANGUAGE_MAX_IMAGES_PER_REQUEST`, ...)."""

from __future__ import annotations

from pydantic import BaseModel, Field, SecretStr

from contracts.grpc_tls import TlsFiles


class InternalSecurity(TlsFiles):
    """The internal gRPC calls' TLS files (`contracts/grpc_tls.py`) and shared secret (`contracts/grpc_secret.py`).

    Servers require the secret on every call but `Health`; the gateway sends it. Unset: none needed."""

    internal_secret: SecretStr | None = None

    def secret(self) -> str | None:
        return self.internal_secret.get_secret_value() if self.internal_secret else None


class GrpcServing(InternalSecurity):
    """Where a vision or language server serves its gRPC service (`contracts/grpc_server.py`), secured as the
    internal calls are, and its Prometheus metrics page (none without a port)."""

    host: str = "127.0.0.1"
    port: int
    metrics_port: int | None = None


class RequestLimits(BaseModel):
    """What one request may ask of a vision or language server; each video frame counts as one image. The gateway
    declares none: it refuses what the chosen language server advertises it would refuse (`Describe`)."""

    max_images_per_request: int = Field(16, ge=0)
