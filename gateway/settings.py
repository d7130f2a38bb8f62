"""Gateway settings: CLI flags override `DVD_GATEWAY_*` environment variables."""

from __future__ import annotations

from pydantic_settings import BaseSettings, SettingsConfigDict


class GatewaySettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DVD_GATEWAY_")

    host: str = "127.0.0.1"
    port: int = 8000
    vision_servers: list[str] = ["127.0.0.1:50051"]  # gRPC addresses
    language_servers: list[str] = ["127.0.0.1:50061"]
    served_model_name: str | None = None  # default: the language server's checkpoint folder name
    request_timeout_s: float = 300.0
    max_images_per_request: int = 16
    max_image_bytes: int = 20 << 20  # after base64 decoding
    max_tiles: int = 12  # per image for detail "high"/"auto"; "low" is one tile
