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
    """(subcommand, its parameters) of a `python -m dvd.cli SUBCOMMAND ...` line, as `dvd` would parse them."""
    assert line[:3] == [sys.executable, "-m", "dvd.cli"], line
    name, *args = line[3:]
    command = CLI.commands[name]
    context = command.make_context(name, list(args))
    return name, {key: value for key, value in context.params.items() if value is not None}


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


def test_the_parser_used_here_refuses_a_flag_the_cli_does_not_have():
    with pytest.raises(Exception, match="No such option: --vision-servers"):  # click's UsageError, vendored by typer
        parsed(command_lines.dvd("gateway", "--vision-servers", "a:1"))
