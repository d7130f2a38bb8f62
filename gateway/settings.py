"""Gateway settings: CLI flags override `DVD_GATEWAY_*` environment variables, which override a settings file."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import (
    BaseSettings,
    JsonConfigSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from contracts.settings import InternalSecurity


class GatewaySettings(BaseSettings, InternalSecurity):  # the shared piece: contracts/settings.py
    model_config = SettingsConfigDict(env_prefix="DVD_GATEWAY_", extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    # gRPC addresses "host:port"; "dns:NAME:PORT" stands for every address NAME resolves to (re-resolved
    # at each health check), each balanced and health-checked on its own.
    vision_servers: list[str] = ["127.0.0.1:50051"]
    language_servers: list[str] = ["127.0.0.1:50061"]
    served_model_name: str | None = None  # default: the language server's checkpoint folder name
    api_keys: list[str] = []  # when set, /v1/* needs "Authorization: Bearer <one of them>"
    tls_server_name: str | None = None  # the name checked in servers' TLS certificates (default: the address's host)
    # Largest request body; a base64 image is 4/3 of its bytes, so 16 images at max_image_bytes need more.
    max_body_bytes: int = Field(100 << 20, gt=0)
    request_timeout_s: float = Field(300.0, gt=0)  # deadline of a request's Encode and Generate calls
    max_in_flight: int = Field(256, ge=0)  # chat completions in progress before new ones get 429; 0: no cap
    retry_after_s: int = Field(1, ge=0)  # the Retry-After of a 429
    health_interval_s: float = Field(5.0, gt=0)  # servers failing a check are ejected until one passes
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
