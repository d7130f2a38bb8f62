"""`dvd`: write checkpoints, run each server, or bring the whole stack up locally."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

from benchmarks.cli import app as bench_app

# Before anything imports vLLM or transformers; vLLM's spawned workers re-import this module too.
from language_server import torch_compat  # noqa: F401
from planner.cli import app as plan_app
from vision_server.settings import VisionServerSettings

app = typer.Typer(help="DvD: decoupled vision-language serving for InternVL3.5.", no_args_is_help=True,
                  pretty_exceptions_enable=False)

app.add_typer(bench_app, name="bench")
app.add_typer(plan_app, name="plan")

DEFAULT_MODEL = Path("checkpoints/tiny")


def _logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _preset_names() -> str:
    from checkpoint.geometry import PRESETS

    return ", ".join(PRESETS)


@app.command()
def checkpoint(
    out: Annotated[Path, typer.Argument(help="Folder to write the checkpoint into")],
    preset: Annotated[str, typer.Option(help=f"The model's geometry: {_preset_names()}")] = "tiny",
    format: Annotated[str, typer.Option("--format", help="hf or custom")] = "custom",
    seed: Annotated[int, typer.Option(help="Random seed of the weights")] = 0,
    flash: Annotated[bool, typer.Option(help="InternVL3.5-Flash: add the ViR router and mlp2 (custom format)")] = False,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="Write the configs and the shard index (model.safetensors.index.json) only: no tokenizer, "
                          "no weights")] = False,
) -> None:
    """Write a random-weight InternVL3.5 checkpoint in a real on-disk format."""
    import dataclasses
    import json

    from checkpoint.generate import write_checkpoint
    from checkpoint.geometry import ModelConfig

    if format not in ("hf", "custom"):
        raise typer.BadParameter("format must be hf or custom", param_hint="--format")
    try:
        config = dataclasses.replace(ModelConfig.from_name(preset), flash=flash)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--preset") from None
    path = write_checkpoint(out, config, format, seed=seed, dry_run=dry_run)
    if not dry_run:
        typer.echo(f"wrote {preset} checkpoint ({format} format) to {path}")
        return
    index = json.loads((path / "model.safetensors.index.json").read_text())
    language, files = config.language, sorted(set(index["weight_map"].values()))
    experts = language.experts
    typer.echo(f"{preset} ({format} format, {language.architecture}): {len(index['weight_map'])} tensors, "
               f"{index['metadata']['total_size'] / 1e9:.2f} GB in {len(files)} shard(s); language model "
               f"{language.num_parameters() / 1e9:.2f}B parameters"
               + (f", {language.num_parameters(active=True) / 1e9:.2f}B active ({experts.experts_per_token} of "
                  f"{experts.num_experts} experts)" if experts else ""))
    typer.echo(f"wrote config and shard index (no weights) to {path}")


def given(**flags) -> dict:
    """The flags given on the command line: a flag left out must not override the server's environment
    (`DVD_VISION_*`, ...) or settings file, so each option's default is None and the settings hold the real one."""
    return {name: value for name, value in flags.items() if value is not None}


def flag_for(settings_cls):
    """Flags for `settings_cls`'s settings, each showing the default the settings class has."""

    def flag(name: str, help: str | None = None):
        default = settings_cls.model_fields[name].default
        return typer.Option(help=help, show_default=False if default is None else str(default))

    return flag


vision_flag = flag_for(VisionServerSettings)


@app.command("vision-server")
def vision_server(
    model: Annotated[str | None, vision_flag("model", "Checkpoint folder (either format)")] = None,
    host: Annotated[str | None, vision_flag("host")] = None,
    port: Annotated[int | None, vision_flag("port")] = None,
    metrics_port: Annotated[int | None, vision_flag("metrics_port", "Prometheus port")] = None,
    device: Annotated[str | None, vision_flag("device", "auto (every GPU, else CPU), or e.g. cuda:0,cuda:1")] = None,
    dtype: Annotated[str | None, vision_flag("dtype", "auto, bfloat16 or float32")] = None,
    compile: Annotated[bool | None, vision_flag("compile", "torch.compile the vision model")] = None,
    feature_dtype: Annotated[str | None, vision_flag("feature_dtype", "Wire dtype: bfloat16, float16, float32")] = None,
    max_batch_tiles: Annotated[int | None, vision_flag("max_batch_tiles", "Tiles per encoder batch")] = None,
    max_batch_wait_ms: Annotated[float | None, vision_flag("max_batch_wait_ms", "Wait for a fuller batch")] = None,
    log_level: str = "info",
) -> None:
    """Serve VisionService: tiling, batched InternViT + MLP projector (+ ViR), features sent to language servers.
    Settings: flags, then DVD_VISION_* environment variables, then defaults."""
    from vision_server.server import main

    _logging(log_level)
    flags = given(model=model, host=host, port=port, metrics_port=metrics_port, device=device, dtype=dtype,
                  feature_dtype=feature_dtype, max_batch_tiles=max_batch_tiles, max_batch_wait_ms=max_batch_wait_ms,
                  compile=compile)
    main(VisionServerSettings(**flags))


@app.command("language-server", add_help_option=False,
             context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def language_server(ctx: typer.Context) -> None:
    """Serve LanguageService: vLLM in embedding-only mode, fed by the feature receiver. Takes DvD's settings and
    vLLM's engine arguments, spelled as `vllm serve` spells them; see its --help."""
    from vllm.platforms import current_platform

    from language_server.arguments import parse
    from language_server.server import main

    arguments = parse(ctx.args, cpu=current_platform.is_cpu())  # vLLM's own parser, so typer passes all on
    _logging(arguments.log_level)
    main(arguments.settings, arguments.engine_args)


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
             "image_fetch_allowed_networks": image_fetch_allowed_network, "feature_cache": feature_cache}
    main(load_settings(config, **given(**flags)))


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def up(
    ctx: typer.Context,
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
    """Start a vision server, a language server and the gateway as local processes, wired together. Any other
    arguments are the language server's: vLLM's engine arguments (`dvd language-server --help`), e.g.
    `dvd up --model M --tensor-parallel-size 2`."""
    from launcher import Stack, run_stack

    _logging("info")
    if not model.exists() and model == DEFAULT_MODEL:
        from checkpoint.generate import write_checkpoint

        write_checkpoint(model, "tiny", "custom")
    stack = Stack(model=str(model), host=host, gateway_port=port, vision_port=vision_port,
                  language_port=language_port, feature_port=feature_port, vision_metrics_port=vision_metrics_port,
                  language_metrics_port=language_metrics_port, dtype=dtype, feature_dtype=feature_dtype,
                  engine_args=tuple(ctx.args))
    raise typer.Exit(run_stack(stack))


if __name__ == "__main__":
    app()
