"""Tenants: each API key is one. A tenant has a name (the label of its metrics and the owner of its stored
responses, never the key), its own limits on the work it has in progress, and its own cache scope.

A cache scope is opaque: an HMAC, under the gateway's cache secret, of the tenant (its name, or for a key
without one, an HMAC of the key) and of the request's own `cache_salt`. It goes into the images' content keys
(the language servers' feature cache, the affinity map, the vision servers' in-flight dedup) and, as vLLM's
`cache_salt`, into the prefix cache's block hashes; so a request finds only what its own tenant cached, with
the same salt. With caches shared across tenants, only the salt separates requests. The servers never see a
key, and no scope can be turned back into one.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from gateway.errors import APIError
from gateway.settings import GatewaySettings, TenantSettings

DEFAULT = "default"  # the one tenant of a gateway without keys
UNKNOWN = "-"  # the tenant label of a request refused before its key was checked (no tenant name is "-")


@dataclass(frozen=True)
class Tenant:
    """One API key's tenant, or a keyless gateway's one."""

    name: str  # the label of its metrics and the owner of its stored responses
    scope_key: bytes  # its cache scopes are HMACs under it
    own_caches: bool = False  # scoped even without a salt (False: a keyless gateway, or caches shared by tenants)
    max_in_flight: int = 0  # requests in progress; 0: only the gateway's cap
    max_tiles_in_flight: int = 0  # the tiles its requests in progress may need; 0: no cap

    def cache_scope(self, salt: str | None = None) -> str:
        """The scope of a request's caches: "" (shared with every request) when neither the tenant's caches are
        its own nor the request brings a salt, else an opaque hex string."""
        if not self.own_caches and salt is None:
            return ""
        message = b"" if salt is None else b"salt\0" + salt.encode()
        return hmac.new(self.scope_key, message, hashlib.sha256).hexdigest()


class Tenants:
    """The gateway's tenants, found by key (`authenticate`)."""

    def __init__(self, settings: GatewaySettings):
        self._secret = settings.cache_secret.get_secret_value().encode() if settings.cache_secret else os.urandom(32)
        shared = settings.share_caches_across_tenants
        configured = [TenantSettings(key=key) for key in settings.api_keys] + settings.tenants
        self._by_digest: dict[bytes, Tenant] = {}
        for tenant, name in zip(configured, settings.tenant_names()):
            key = tenant.key.get_secret_value().encode()
            # A named tenant's caches follow its name; an unnamed key's follow the key (never the key itself).
            identity = b"name\0" + name.encode() if tenant.name else b"key\0" + self._hmac(key)
            self._by_digest[hashlib.sha256(key).digest()] = Tenant(
                name, self._hmac(b"shared" if shared else identity), own_caches=not shared,
                max_in_flight=_given(tenant.max_in_flight, settings.tenant_max_in_flight),
                max_tiles_in_flight=_given(tenant.max_tiles_in_flight, settings.tenant_max_tiles_in_flight))
        # Without keys: one tenant, with the gateway's limits only, its caches shared by all its requests.
        self.default = None if self._by_digest else Tenant(DEFAULT, self._hmac(b"shared"))

    def _hmac(self, message: bytes) -> bytes:
        return hmac.new(self._secret, message, hashlib.sha256).digest()

    @property
    def names(self) -> list[str]:
        """Every tenant's metrics label."""
        return [self.default.name] if self.default else [tenant.name for tenant in self._by_digest.values()]

    def authenticate(self, authorization: str) -> Tenant:
        """The tenant of `Authorization: Bearer <key>` (any request, without keys); 401 otherwise."""
        if self.default is not None:
            return self.default
        scheme, _, key = authorization.partition(" ")
        # Looked up by digest: the time taken does not depend on how much of a key a guess got right.
        tenant = self._by_digest.get(hashlib.sha256(key.strip().encode()).digest()) \
            if scheme.lower() == "bearer" else None
        if tenant is None:
            raise APIError(401, "missing or invalid API key: send 'Authorization: Bearer <key>'",
                           headers={"www-authenticate": "Bearer"})
        return tenant


def _given(value: int | None, default: int) -> int:
    return default if value is None else value


async def current_tenant(request: Request) -> Tenant:
    """The request's tenant (a route dependency): 401 without a valid key when the gateway has keys. Kept on
    `request.state` for the error handler's metrics."""
    request.state.tenant = request.app.state.tenants.authenticate(request.headers.get("authorization", ""))
    return request.state.tenant


def tenant_label(request: Request) -> str:
    """The tenant label of a request's metrics ("-" before its key was checked)."""
    tenant = getattr(request.state, "tenant", None)
    return tenant.name if tenant is not None else UNKNOWN


TenantDep = Annotated[Tenant, Depends(current_tenant)]
