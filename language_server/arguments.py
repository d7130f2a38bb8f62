"""`dvd language-server`'s command line: DvD's own settings beside vLLM's engine arguments, one parser.

The engine arguments are vLLM's own (`AsyncEngineArgs.add_cli_args`, spelled as `vllm serve` spells them), so a
new vLLM release's arguments come along. Those DvD sets itself (`engine.REFUSED`) are refused with the
reason; on CPU the defaults are `engine.CPU_DEFAULTS`, on a GPU vLLM's own. Where they come from, the later
winning: the defaults, `DVD_LANGUAGE_ENGINE_ARGS` (the same flags in one string, for compose and
Kubernetes), the command line. DvD's own settings keep their rule: flags, then `DVD_LANGUAGE_*`, then
defaults (`language_server/settings.py`).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
from collections.abc import Mapping

from language_server.engine import REFUSED, default_engine_arguments
from language_server.settings import LanguageServerSettings

ENV_PREFIX = LanguageServerSettings.model_config["env_prefix"]
ENGINE_ARGS_ENV = f"{ENV_PREFIX}ENGINE_ARGS"
PROG = "dvd language-server"

# DvD's flags: (flag, settings field, help); each shows the settings class's default and its variable.
DVD_FLAGS = (
    ("--model", "model", "Checkpoint folder (either format)"),
    ("--host", "host", "gRPC address to listen on"),
    ("--port", "port", "gRPC LanguageService port"),
    ("--feature-bind", "feature_bind", "Feature receiver's endpoint (tcp://host:port, rdma://host:port)"),
    ("--feature-advertise", "feature_advertise", "Where vision servers send features (default: the bound one)"),
    ("--metrics-port", "metrics_port", "Prometheus port"),
    ("--kv-cache-gib", "kv_cache_gib", "KV cache size on CPU, GiB (VLLM_CPU_KVCACHE_SPACE)"),
    ("--tool-call-parser", "tool_call_parser", "vLLM tool call parser for the output"),
    ("--reasoning-parser", "reasoning_parser",
     "vLLM reasoning parser for the output (the engine's structured output does not wait for the reasoning's end)"),
)
FEATURE_CACHE_BYTES_PER_MIB = 1 << 20


@dataclasses.dataclass(frozen=True)
class LanguageServerArguments:
    """What `dvd language-server` was given: DvD's settings, the engine's arguments, the log level."""

    settings: LanguageServerSettings
    engine_args: object  # vLLM's AsyncEngineArgs
    log_level: str


class Refused(argparse.Action):
    """An engine argument DvD sets itself: giving it is an error that says why."""

    def __init__(self, option_strings, dest, message: str, **kwargs):
        super().__init__(option_strings, dest, nargs="?", default=argparse.SUPPRESS, metavar="VALUE", help=message)
        self.message = message

    def __call__(self, parser, namespace, values, option_string=None):
        raise argparse.ArgumentError(self, self.message)


def _refuse(parser, group, refused: Mapping[str, str]) -> None:
    """Replace the actions of `refused` (dest -> message) by `Refused` ones with the same flags."""
    actions = {action.dest: action for action in parser._actions}  # vLLM's parsers are argparse's
    for dest, message in refused.items():
        group.add_argument(*actions[dest].option_strings, action=Refused, dest=dest, message=message)


def engine_parser(cpu: bool, prog: str = PROG, description: str | None = None):
    """vLLM's engine arguments with DvD's defaults for the platform (`cpu`) and its refusals."""
    from vllm import AsyncEngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    # "resolve": a flag added again replaces vLLM's (a refusal, or a DvD setting of the same spelling).
    parser = FlexibleArgumentParser(prog=prog, usage=f"{prog} [options]", description=description,
                                    conflict_handler="resolve")
    AsyncEngineArgs.add_cli_args(parser)
    parser.set_defaults(**default_engine_arguments(cpu))
    group = parser.add_argument_group("DvD-refused", "Engine arguments the language server sets itself.")
    _refuse(parser, group, {dest: f"DvD sets this itself: {reason}." for dest, reason in REFUSED.items()})
    return parser


def _flag(name: str, value: object) -> str:
    flag = "--" + name.replace("_", "-")
    if isinstance(value, bool):
        return flag if value else "--no-" + flag[2:]
    return f"{flag} {value}"


def _describe(cpu: bool) -> str:
    defaults = " ".join(_flag(name, value) for name, value in default_engine_arguments(cpu).items())
    refused = " ".join("--" + name.replace("_", "-") for name in REFUSED)
    return f"""Serve LanguageService: vLLM in embedding-only mode, fed image features by the vision server.

DvD's own settings: group DvD (--help=dvd); each also from its {ENV_PREFIX}* variable.
vLLM's engine arguments as `vllm serve` spells them: the groups below (--help=<group>, --help=all,
  --help=<part of a flag>); also from {ENGINE_ARGS_ENV}='--tensor-parallel-size 2 ...', flags given here win.
DvD's defaults on this machine ({"CPU" if cpu else "GPU"}) where they differ from vLLM's:
  {defaults}
Refused, since DvD sets them itself (--help=dvd-refused says why):
  {refused}"""


def build_parser(cpu: bool):
    """The whole command line: DvD's settings, then vLLM's engine arguments."""
    parser = engine_parser(cpu, description=_describe(cpu))
    dvd = parser.add_argument_group(
        "DvD", f"The language server's own settings; each also from its {ENV_PREFIX}* variable.")
    for flag, field, help in DVD_FLAGS:
        default = LanguageServerSettings.model_fields[field].default  # the settings check the values
        shown = "" if default is None else f"default: {default}; "
        dvd.add_argument(flag, dest=field, default=argparse.SUPPRESS,
                         help=f"{help} ({shown}{ENV_PREFIX}{field.upper()}).")
    dvd.add_argument("--feature-cache-mib", type=int, default=argparse.SUPPRESS, help=(
        "Features of recently used images kept for later turns of a chat, MiB; 0: off (default: "
        f"{LanguageServerSettings.model_fields['feature_cache_bytes'].default >> 20}; "
        f"{ENV_PREFIX}FEATURE_CACHE_BYTES in bytes)."))
    # Replaces vLLM's --log-level (same meaning: vLLM's logging too), in any case.
    dvd.add_argument("--log-level", type=str.upper, choices=["CRITICAL", "ERROR", "WARNING", "INFO", "DEBUG"],
                     default=argparse.SUPPRESS, help="Log level of DvD and vLLM (default: INFO).")
    return parser


def _check_environment(engine_fields: set[str]) -> None:
    """A `DVD_LANGUAGE_<ENGINE ARGUMENT>` variable is no setting (some were, before vLLM's engine arguments came
    as flags): refuse it rather than let it be silently ignored."""
    for key in os.environ:
        field = key.removeprefix(ENV_PREFIX).lower()
        if key.startswith(ENV_PREFIX) and field in engine_fields and field not in LanguageServerSettings.model_fields:
            raise SystemExit(f"{key} is not read: vLLM's engine arguments are flags, from the command line or from "
                             f"{ENGINE_ARGS_ENV}, e.g. {ENGINE_ARGS_ENV}='--{field.replace('_', '-')} VALUE'")


def parse(argv: list[str], cpu: bool) -> LanguageServerArguments:
    """DvD's settings and vLLM's engine arguments from `argv` and the environment; `cpu`: whether vLLM runs on
    CPU here (the defaults then are DvD's CPU ones)."""
    from vllm import AsyncEngineArgs

    parser = build_parser(cpu)
    given = vars(parser.parse_args(argv))  # first, so that --help and a bad flag answer at once
    _check_environment({field.name for field in dataclasses.fields(AsyncEngineArgs)})
    flags = {field: given[field] for _, field, _ in DVD_FLAGS if field in given}
    if "feature_cache_mib" in given:
        flags["feature_cache_bytes"] = given["feature_cache_mib"] * FEATURE_CACHE_BYTES_PER_MIB
    settings = LanguageServerSettings(**flags)

    from_environment = engine_parser(cpu, prog=ENGINE_ARGS_ENV)
    _refuse(from_environment, from_environment, {
        name: f"a DvD setting, not an engine argument: give it as {ENV_PREFIX}{name.upper()} or as a flag"
        for name in ("model", "reasoning_parser")})
    namespace = from_environment.parse_args(shlex.split(settings.engine_args))
    namespace = parser.parse_args(argv, namespace=namespace)  # the command line wins
    for name in ("feature_cache_mib", *(field for _, field, _ in DVD_FLAGS)):  # DvD's, not the engine's
        vars(namespace).pop(name, None)
    namespace.model = settings.model
    return LanguageServerArguments(settings, AsyncEngineArgs.from_cli_args(namespace), given.get("log_level", "INFO"))


def coverage() -> dict:
    """vLLM's engine arguments (those `vllm serve` takes) on this command line: how many reach the engine, which
    are DvD's own settings under vLLM's spelling, and which are refused, with why."""
    from vllm import AsyncEngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    vllm_arguments = {a.dest: a.option_strings[0] for a in AsyncEngineArgs.add_cli_args(FlexibleArgumentParser())
                      ._actions if a.dest != "help"}
    ours = {action.dest: action for action in build_parser(cpu=True)._actions}
    dvds = {field for _, field, _ in DVD_FLAGS} - {"model"}  # --model is DvD's setting and the engine's model
    return {
        "vllm_engine_arguments": len(vllm_arguments),
        "passed_to_the_engine": sum(1 for dest in vllm_arguments if dest in ours and dest not in dvds
                                    and not isinstance(ours[dest], Refused)),
        "dvd_settings_with_vllms_spelling": sorted(vllm_arguments[dest] for dest in vllm_arguments if dest in dvds),
        "refused": {vllm_arguments[dest]: REFUSED[dest] for dest in vllm_arguments if isinstance(ours[dest], Refused)},
    }


if __name__ == "__main__":
    import json

    print(json.dumps(coverage(), indent=2))
