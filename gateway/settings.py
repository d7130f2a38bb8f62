"""Gateway settings: CLI flags override `DVD_GATEWAY_*` environment variables, which override a settings file."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator
from pydantic_settings import (
    BaseSettings,
    JsonConfigSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from contracts.settings import InternalSecurity

TENANT_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"


class TenantSettings(BaseModel):
    """One API key as a tenant: its name (the tenant label of the gateway's metrics, the owner of its stored
    responses; never the key) and its own limits, each defaulting to the gateway's `tenant_*` setting."""

    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)  # an error never echoes a key

    key: SecretStr = Field(min_length=1)
    name: str | None = Field(None, pattern=TENANT_NAME)  # default: key-N, N its position among all keys
    max_in_flight: int | None = Field(None, ge=0)  # its requests in progress; 0: only the gateway's cap
    max_tiles_in_flight: int | None = Field(None, ge=0)  # the tiles its requests in progress may need; 0: no cap


class GatewaySettings(BaseSettings, InternalSecurity):  # the shared piece: contracts/settings.py
    # hide_input_in_errors: a settings error never echoes a key (or any other value) back.
    model_config = SettingsConfigDict(env_prefix="DVD_GATEWAY_", extra="forbid", hide_input_in_errors=True)

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    # gRPC addresses "host:port"; "dns:NAME:PORT" stands for every address NAME resolves to (re-resolved
    # at each health check), each balanced and health-checked on its own.
    vision_servers: list[str] = ["127.0.0.1:50051"]
    language_servers: list[str] = ["127.0.0.1:50061"]
    served_model_name: str | None = None  # default: the language server's checkpoint folder name
    # With keys, /v1/* needs "Authorization: Bearer <key>", and each key is a tenant: its stored responses are its
    # own, its caches too (unless shared), and it has its own limits. `api_keys` are tenants with the default
    # limits, named key-1, key-2, ... by position; `tenants` ([[tenants]] in TOML) may name theirs and set their
    # own. Without keys, every request belongs to one tenant ("default") with only the gateway's limits.
    api_keys: list[SecretStr] = []
    tenants: list[TenantSettings] = []
    tenant_max_in_flight: int = Field(64, ge=0)  # a tenant's requests in progress before its own 429; 0: no cap
    # A tenant's queued work: the tiles its requests in progress may need (each image's tile limit, its
    # thumbnail included; a video frame is one tile). A request over it alone runs when the tenant has nothing
    # else in progress. 0: no cap.
    tenant_max_tiles_in_flight: int = Field(0, ge=0)
    # Caches (image features, the vision server's in-flight encodes, vLLM's prefix cache) are scoped per tenant,
    # so that nobody learns from a cache hit what another tenant sent. Shared: more hits, for tenants that trust
    # each other. A request's own `cache_salt` scopes its caches further either way.
    share_caches_across_tenants: bool = False
    # Cache scopes are HMACs under this secret; unset: a random one per gateway process (then gateway replicas,
    # and a restarted gateway, do not find each other's cached entries; give every replica the same one).
    cache_secret: SecretStr | None = None
    tls_server_name: str | None = None  # the name checked in servers' TLS certificates (default: the address's host)
    # Largest request body; a base64 image is 4/3 of its bytes, so 16 images at max_image_bytes need more.
    max_body_bytes: int = Field(100 << 20, gt=0)
    request_timeout_s: float = Field(300.0, gt=0)  # deadline of a request's Encode and Generate calls
    max_in_flight: int = Field(256, ge=0)  # chat completions in progress before new ones get 429; 0: no cap
    retry_after_s: int = Field(1, ge=0)  # the Retry-After of a 429
    health_interval_s: float = Field(5.0, gt=0)  # servers failing a check are ejected until one passes
    ejected_check_interval_s: float = Field(1.0, gt=0)  # ejected servers are checked this often: back sooner
    health_timeout_s: float = Field(2.0, gt=0)
    max_n: int = Field(8, ge=1)  # choices per request
    # Images per request: no setting here; each language server advertises its own limit (`Describe`).
    max_image_bytes: int = Field(20 << 20, gt=0)  # per image, after base64 decoding or download
    max_tiles: int = Field(12, ge=1)  # per image for detail "high"/"auto"; "low" is one tile
    video_frames: int = Field(8, ge=1, le=64)  # frames sampled from a video_url part, one tile each
    max_video_bytes: int = Field(64 << 20, ge=1)  # after base64 decoding
    image_fetch_timeout_s: float = Field(10.0, gt=0)  # whole download of one http(s) image, redirects included
    image_fetch_max_redirects: int = Field(3, ge=0)
    # http(s) images from private, loopback, link-local or otherwise non-global addresses are refused
    # (SSRF); networks listed here (CIDR, e.g. "10.1.0.0/16") are allowed all the same.
    image_fetch_allowed_networks: list[str] = []
    # Images are named by content; a language server that holds an image's features is not sent them
    # again, and later turns of a chat prefer the server holding its images (while it carries at most
    # `affinity_max_extra_load` more requests than the least loaded one).
    feature_cache: bool = True
    affinity_max_extra_load: int = Field(4, ge=0)
    # Responses API: stored responses (for previous_response_id and GET), with their whole conversations
    # (images included), kept in memory this long and within this many bytes, the oldest dropped first.
    responses_store_ttl_s: float = Field(3600.0, gt=0)
    responses_store_max_bytes: int = Field(256 << 20, ge=0)

    @model_validator(mode="after")
    def _distinct_tenants(self) -> GatewaySettings:
        keys = [k.get_secret_value() for k in self.api_keys] + [t.key.get_secret_value() for t in self.tenants]
        for position, key in enumerate(keys):
            if key in keys[:position]:  # positions only: the message must not hold the key
                raise ValueError(f"API keys {keys.index(key) + 1} and {position + 1} (api_keys, then tenants) are "
                                 "the same; each key is one tenant")
        names = self.tenant_names()
        for name in names:
            if names.count(name) > 1:
                raise ValueError(f"tenant name {name!r} is given to {names.count(name)} keys; names must differ")
        return self

    def tenant_names(self) -> list[str]:
        """Every key's tenant name, in order (`api_keys`, then `tenants`); key-N for a key without one."""
        named = [None] * len(self.api_keys) + [t.name for t in self.tenants]
        return [name or f"key-{position}" for position, name in enumerate(named, start=1)]


def load_settings(config_file: Path | str | None = None, **overrides) -> GatewaySettings:
    """Settings from `overrides` (CLI) > environment > `config_file` (.toml or .json) > defaults."""
    if config_file is None:
        return GatewaySettings(**overrides)
    path = Path(config_file)
    if not path.is_file():
        raise FileNotFoundError(f"gateway settings file {path} does not exist")
    source_cls = {".toml": TomlConfigSettingsSource, ".json": JsonConfigSettingsSource}.get(path.suffix)
    if source_cls is None:
        raise ValueError(f"gateway settings file {path}: use a .toml or .json file")

    class FileSettings(GatewaySettings):
        @classmethod
        def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings,
                                       file_secret_settings) -> tuple[PydanticBaseSettingsSource, ...]:
            return init_settings, env_settings, source_cls(settings_cls, path)

    return FileSettings(**overrides)
