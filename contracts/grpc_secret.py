"""A shared secret on the internal gRPC calls (gateway -> vision and language servers).

When a secret is configured, every call carries `authorization: Bearer <secret>` and the servers refuse
calls without it (UNAUTHENTICATED) before the request is even parsed. `Health` stays open, so that
container and load-balancer probes need no secret; it reveals nothing but readiness.
"""

from __future__ import annotations

import hmac

import grpc

METADATA_KEY = "authorization"
OPEN_METHODS = frozenset({"/dvd.v1.VisionService/Health", "/dvd.v1.LanguageService/Health"})


class SecretCheck(grpc.aio.ServerInterceptor):
    """Server side: calls to any method but `Health` must carry the secret."""

    def __init__(self, secret: str):
        self._expected = f"Bearer {secret}".encode()

    def _authorized(self, details: grpc.HandlerCallDetails) -> bool:
        for key, value in details.invocation_metadata or ():
            if key == METADATA_KEY:
                presented = value.encode() if isinstance(value, str) else value
                return hmac.compare_digest(presented, self._expected)
        return False

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        if handler is None or details.method in OPEN_METHODS or self._authorized(details):
            return handler

        async def refuse(request, context: grpc.aio.ServicerContext):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                f"{details.method}: missing or wrong internal secret (authorization metadata)")

        # No deserializer: a refused call's bytes are never parsed.
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(refuse)
        return grpc.unary_unary_rpc_method_handler(refuse)


class _SecretMetadata:
    """Client side: adds the secret to every call's metadata."""

    def __init__(self, secret: str):
        self._entry = (METADATA_KEY, f"Bearer {secret}")

    def _with_secret(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        metadata = grpc.aio.Metadata(*(details.metadata or ()), self._entry)
        return grpc.aio.ClientCallDetails(details.method, details.timeout, metadata, details.credentials,
                                          details.wait_for_ready)


# A channel files each interceptor under the first call kind it implements: one class per kind.
class _UnarySecret(_SecretMetadata, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, details, request):
        return await continuation(self._with_secret(details), request)


class _StreamSecret(_SecretMetadata, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, details, request):
        return await continuation(self._with_secret(details), request)


def server_interceptors(secret: str | None) -> list[grpc.aio.ServerInterceptor]:
    return [SecretCheck(secret)] if secret else []


def client_interceptors(secret: str | None) -> list:
    return [_UnarySecret(secret), _StreamSecret(secret)] if secret else []
