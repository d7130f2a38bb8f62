"""The command lines the launcher and the benchmarks write (`launcher/command_lines.py`), parsed by the real `dvd`
CLI (click's parser over `dvd.cli.app`; nothing started): a renamed or removed flag fails here, not in a
deployment, and each value lands in the setting it is meant for."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import typer

from dvd.cli import app
from launcher import Stack, command_lines

CLI = typer.main.get_command(app)


def parsed(line: list[str]) -> tuple[str, dict]:
    """(subcommand, its parameters) of a `python -m dvd.cli SUBCOMMAND ...` line, as `dvd` would parse them; a
    pinned line's prefix (`taskset -c CORES env NAME=VALUE ...`) is left out."""
    line = line[line.index(sys.executable):]
    assert line[:3] == [sys.executable, "-m", "dvd.cli"], line
    name, *args = line[3:]
    if name == "language-server":  # typer hands its arguments to the language server's own parser (vLLM's)
        return name, language_server_parameters(args)
    command = CLI.commands[name]
    context = command.make_context(name, list(args))
    return name, {key: value for key, value in context.params.items() if value is not None}


def language_server_parameters(args: list[str]) -> dict:
    """DvD's settings given on a language-server line and the engine arguments that differ from the defaults."""
    from language_server.arguments import parse

    arguments, defaults = parse(args, cpu=True), parse(["--model", "unused"], cpu=True)
    settings = arguments.settings.model_dump(exclude_unset=True)
    engine = {name: value for name, value in vars(arguments.engine_args).items()
              if name != "model" and value != getattr(defaults.engine_args, name)}
    return {**settings, **engine, "log_level": arguments.log_level.lower()}


def stack() -> Stack:
    return Stack(model="/ckpt/tiny", host="10.0.0.7", gateway_port=8001, vision_port=50052, language_port=50062,
                 feature_port=5601, vision_metrics_port=9101, language_metrics_port=9102, dtype="bfloat16",
                 vision_dtype="float32", feature_dtype="float16", max_model_len=4096)


def test_every_server_of_a_stack_gets_each_setting_under_the_flag_the_cli_reads():
    lines = stack().commands()
    assert parsed(lines["vision-server"]) == ("vision-server", {
        "model": "/ckpt/tiny", "host": "10.0.0.7", "port": 50052, "metrics_port": 9101, "dtype": "float32",
        "feature_dtype": "float16", "log_level": "info"})
    assert parsed(lines["language-server"]) == ("language-server", {
        "model": "/ckpt/tiny", "host": "10.0.0.7", "port": 50062, "feature_bind": "tcp://10.0.0.7:5601",
        "metrics_port": 9102, "dtype": "bfloat16", "max_model_len": 4096, "log_level": "info"})
    name, gateway = parsed(lines["gateway"])
    assert name == "gateway"
    assert {k: gateway[k] for k in ("host", "port", "vision_server", "language_server")} == {
        "host": "10.0.0.7", "port": 8001, "vision_server": ["10.0.0.7:50052"], "language_server": ["10.0.0.7:50062"]}


def test_dvd_up_line_of_a_stack_sets_every_port_of_it():
    name, up = parsed(stack().up_command())
    assert name == "up" and up["model"] == Path("/ckpt/tiny")
    assert {k: up[k] for k in ("port", "vision_port", "language_port", "feature_port", "vision_metrics_port",
                               "language_metrics_port")} == {
        "port": 8001, "vision_port": 50052, "language_port": 50062, "feature_port": 5601, "vision_metrics_port": 9101,
        "language_metrics_port": 9102}


def test_arguments_left_at_none_are_left_off_so_the_servers_settings_decide():
    assert parsed(command_lines.vision_server("m")) == ("vision-server", {"model": "m", "log_level": "info"})
    assert parsed(command_lines.language_server("m")) == ("language-server", {"model": "m", "log_level": "info"})


def test_a_gateway_line_takes_several_servers_a_model_name_and_the_feature_cache_switch():
    for cache in (True, False):
        line = command_lines.gateway(["a:1", "b:2"], ["c:3"], port=8002, served_model_name="tiny",
                                     feature_cache=cache)
        _, gateway = parsed(line)
        assert {k: gateway.get(k) for k in ("port", "served_model_name", "vision_server", "language_server",
                                            "feature_cache")} == {
            "port": 8002, "served_model_name": "tiny", "vision_server": ["a:1", "b:2"], "language_server": ["c:3"],
            "feature_cache": cache}


def test_a_gateway_line_takes_a_settings_file():
    _, gateway = parsed(command_lines.gateway(["a:1"], ["c:3"], config="/etc/dvd/gateway.toml"))
    assert gateway["config"] == Path("/etc/dvd/gateway.toml")


def test_the_parser_used_here_refuses_a_flag_the_cli_does_not_have():
    with pytest.raises(Exception, match="No such option: --vision-servers"):  # click's UsageError, vendored by typer
        parsed(command_lines.dvd("gateway", "--vision-servers", "a:1"))


def test_plan_validation_pins_every_server_of_a_configuration_with_flags_the_cli_reads(tmp_path):
    from benchmarks.plan_validation.servers import configuration

    launched, _, url = configuration(tmp_path / "ckpt", vision=2, language=2, log_dir=tmp_path)
    lines = {name: parsed(line) for name, line in launched.commands.items()}
    assert sorted(lines) == ["gateway", "language-0", "language-1", "vision-0", "vision-1"]
    assert all(line[:2] == ["taskset", "-c"] for name, line in launched.commands.items() if name != "gateway")
    vision = [params["port"] for name, params in lines.values() if name == "vision-server"]
    language = [params["port"] for name, params in lines.values() if name == "language-server"]
    gateway = lines["gateway"][1]
    assert gateway["vision_server"] == [f"127.0.0.1:{port}" for port in vision]
    assert gateway["language_server"] == [f"127.0.0.1:{port}" for port in language]
    assert url == f"http://127.0.0.1:{gateway['port']}" and gateway["served_model_name"] == "tiny"
    assert all(params["feature_bind"].startswith("tcp://127.0.0.1:") for name, params in lines.values()
               if name == "language-server")


def test_the_dispatch_benchmarks_second_gateway_turns_the_feature_cache_off():
    from benchmarks.dispatch import two_gateways

    launched, gateways, _ = two_gateways("/ckpt/tiny")
    on, off = parsed(launched.commands["gateway"])[1], parsed(launched.commands["gateway-no-cache"])[1]
    assert off["feature_cache"] is False and "feature_cache" not in on
    assert (off["vision_server"], off["language_server"]) == (on["vision_server"], on["language_server"])
    assert gateways["cache_off"].endswith(f":{off['port']}")
