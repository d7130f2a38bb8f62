"""`dvd`: write checkpoints, run each server, or bring the whole stack up locally."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

from benchmarks.cli import app as bench_app

# Before anything imports vLLM or transformers; vLLM's spawned workers re-import this module too.
from language_server import torchvision_compat  # noqa: F401
from planner.cli import app as plan_app

app = typer.Typer(help="DvD: decoupled vision-language serving for InternVL3.5.", no_args_is_help=True,
                  pretty_exceptions_enable=False)

app.add_typer(bench_app, name="bench")
app.add_typer(plan_app, name="plan")

DEFAULT_MODEL = Path("checkpoints/tiny")


def _logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


@app.command()
def checkpoint(
    out: Annotated[Path, typer.Argument(help="Folder to write the checkpoint into")],
    preset: Annotated[str, typer.Option(help="tiny, 1b, 2b, 4b or 8b")] = "tiny",
    format: Annotated[str, typer.Option("--format", help="hf or custom")] = "custom",
    seed: Annotated[int, typer.Option(help="Random seed of the weights")] = 0,
    flash: Annotated[bool, typer.Option(help="InternVL3.5-Flash: add the ViR router and mlp2 (custom format)")] = False,
) -> None:
    """Write a random-weight InternVL3.5 checkpoint in a real on-disk format."""
    import dataclasses

    from checkpoint.generate import write_checkpoint
    from checkpoint.presets import ModelConfig

    if format not in ("hf", "custom"):
        raise typer.BadParameter("format must be hf or custom", param_hint="--format")
    config = dataclasses.replace(ModelConfig.from_name(preset), flash=flash)
    path = write_checkpoint(out, config, format, seed=seed)
    typer.echo(f"wrote {preset} checkpoint ({format} format) to {path}")


@app.command("vision-server")
def vision_server(
    model: Annotated[str, typer.Option(help="Checkpoint folder (either format)")] = str(DEFAULT_MODEL),
    host: str = "127.0.0.1",
    port: int = 50051,
    metrics_port: Annotated[int | None, typer.Option(help="Prometheus port")] = None,
    device: Annotated[str, typer.Option(help="auto (every GPU, else CPU), or e.g. cuda:0,cuda:1")] = "auto",
    dtype: Annotated[str, typer.Option(help="auto, bfloat16 or float32")] = "auto",
    compile: Annotated[bool, typer.Option(help="torch.compile the vision model")] = False,
    feature_dtype: Annotated[str, typer.Option(help="Dtype on the wire: bfloat16, float16 or float32")] = "bfloat16",
    max_batch_tiles: Annotated[int, typer.Option(help="Tiles per encoder batch, across requests")] = 32,
    max_batch_wait_ms: Annotated[float, typer.Option(help="Longest wait of a tile for a fuller batch")] = 5.0,
    log_level: str = "info",
) -> None:
    """Serve VisionService: tiling, batched InternViT + MLP projector (+ ViR), features sent to language servers."""
    from vision_server.server import main
    from vision_server.settings import VisionServerSettings

    _logging(log_level)
    main(VisionServerSettings(model=model, host=host, port=port, metrics_port=metrics_port, device=device,
                              dtype=dtype, feature_dtype=feature_dtype, max_batch_tiles=max_batch_tiles,
                              max_batch_wait_ms=max_batch_wait_ms, compile=compile))


@app.command("language-server")
def language_server(
    model: Annotated[str, typer.Option(help="Checkpoint folder (either format)")] = str(DEFAULT_MODEL),
    host: str = "127.0.0.1",
    port: int = 50061,
    feature_bind: Annotated[str, typer.Option(help="ZeroMQ endpoint the feature receiver binds")] = "tcp://127.0.0.1:5600",
    feature_advertise: Annotated[str | None, typer.Option(help="Endpoint vision servers send to")] = None,
    metrics_port: Annotated[int | None, typer.Option(help="Prometheus port")] = None,
    dtype: Annotated[str, typer.Option(help="vLLM dtype (auto, bfloat16, float32)")] = "auto",
    max_model_len: int = 8192,
    kv_cache_gib: Annotated[int, typer.Option(help="KV cache size on CPU, GiB")] = 1,
    feature_cache_mib: Annotated[int, typer.Option(
        help="Features of recently used images kept for later turns of a chat, MiB; 0: off")] = 2048,
    log_level: str = "info",
) -> None:
    """Serve LanguageService: vLLM in embedding-only mode, fed by the feature receiver."""
    from language_server.server import main
    from language_server.settings import LanguageServerSettings

    _logging(log_level)
    main(LanguageServerSettings(model=model, host=host, port=port, feature_bind=feature_bind,
                                feature_advertise=feature_advertise, metrics_port=metrics_port, dtype=dtype,
                                max_model_len=max_model_len, kv_cache_gib=kv_cache_gib,
                                feature_cache_bytes=feature_cache_mib << 20))


@app.command()
def gateway(
    config: Annotated[Path | None, typer.Option(help="Settings file (.toml or .json); flags, env override it")] = None,
    host: str | None = None,
    port: int | None = None,
    vision_server: Annotated[list[str] | None, typer.Option(
        help="Vision server gRPC address (repeatable); dns:NAME:PORT stands for all of NAME's addresses")] = None,
    language_server: Annotated[list[str] | None, typer.Option(
        help="Language server gRPC address (repeatable); dns:NAME:PORT stands for all of NAME's addresses")] = None,
    served_model_name: str | None = None,
    api_key: Annotated[list[str] | None, typer.Option(
        help="Accepted API key (repeatable); prefer DVD_GATEWAY_API_KEYS='[\"...\"]' or the settings file")] = None,
    max_in_flight: Annotated[int | None, typer.Option(help="Requests in progress before 429; 0: no cap")] = None,
    request_timeout_s: Annotated[float | None, typer.Option(help="Deadline of one request")] = None,
    health_interval_s: Annotated[float | None, typer.Option(help="Seconds between health checks")] = None,
    max_images_per_request: int | None = None,
    image_fetch_allowed_network: Annotated[list[str] | None, typer.Option(
        help="Network (CIDR) that http(s) image URLs may point into although it is not public (repeatable)")] = None,
    feature_cache: Annotated[bool | None, typer.Option(
        help="Send language servers only the images' features they do not hold yet")] = None,
    log_level: str = "info",
) -> None:
    """Serve the OpenAI-compatible API in front of the vision and language servers."""
    from gateway.server import main
    from gateway.settings import load_settings

    _logging(log_level)
    flags = {"host": host, "port": port, "vision_servers": vision_server, "language_servers": language_server,
             "served_model_name": served_model_name, "api_keys": api_key, "max_in_flight": max_in_flight,
             "request_timeout_s": request_timeout_s, "health_interval_s": health_interval_s,
             "max_images_per_request": max_images_per_request,
             "image_fetch_allowed_networks": image_fetch_allowed_network, "feature_cache": feature_cache}
    main(load_settings(config, **{name: value for name, value in flags.items() if value is not None}))


@app.command()
def up(
    model: Annotated[Path, typer.Option(help="Checkpoint folder; the tiny one is written if missing")] = DEFAULT_MODEL,
    port: Annotated[int, typer.Option(help="Gateway port")] = 8000,
    host: str = "127.0.0.1",
    dtype: Annotated[str, typer.Option(help="Language model dtype")] = "auto",
    feature_dtype: Annotated[str, typer.Option(help="Dtype on the wire: bfloat16, float16 or float32")] = "bfloat16",
    vision_port: int = 50051,
    language_port: int = 50061,
    feature_port: Annotated[int, typer.Option(help="Language server's feature receiver port")] = 5600,
    vision_metrics_port: int | None = None,
    language_metrics_port: int | None = None,
) -> None:
    """Start a vision server, a language server and the gateway as local processes, wired together."""
    from dvd.launcher import Stack, run_stack

    _logging("info")
    if not model.exists() and model == DEFAULT_MODEL:
        from checkpoint.generate import write_checkpoint

        write_checkpoint(model, "tiny", "custom")
    stack = Stack(model=str(model), host=host, gateway_port=port, vision_port=vision_port,
                  language_port=language_port, feature_port=feature_port, vision_metrics_port=vision_metrics_port,
                  language_metrics_port=language_metrics_port, dtype=dtype, feature_dtype=feature_dtype)
    raise typer.Exit(run_stack(stack))


if __name__ == "__main__":
    app()
