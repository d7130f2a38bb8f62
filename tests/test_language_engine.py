"""The language server's vLLM settings and engine arguments: what needs no engine to check."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from language_server.arguments import ENGINE_ARGS_ENV, ENV_PREFIX, Refused, build_parser, coverage, parse
from language_server.engine import CPU_DEFAULTS, REFUSED, set_cpu_kv_cache
from language_server.settings import LanguageServerSettings
from language_server.vllm_plugin import BUSY_POLL_ENV, EXIT_FAST_ENV


def test_a_given_kv_cache_size_beats_an_inherited_vllm_cpu_kvcache_space():
    environ = {"VLLM_CPU_KVCACHE_SPACE": "1"}
    set_cpu_kv_cache(LanguageServerSettings(kv_cache_gib=3), environ)
    assert environ["VLLM_CPU_KVCACHE_SPACE"] == "3"


def test_the_kv_cache_default_leaves_an_inherited_vllm_cpu_kvcache_space_alone(monkeypatch):
    monkeypatch.delenv("DVD_LANGUAGE_KV_CACHE_GIB", raising=False)
    environ = {"VLLM_CPU_KVCACHE_SPACE": "5"}
    set_cpu_kv_cache(LanguageServerSettings(), environ)
    assert environ["VLLM_CPU_KVCACHE_SPACE"] == "5"


def test_the_kv_cache_default_fills_an_absent_vllm_cpu_kvcache_space(monkeypatch):
    monkeypatch.delenv("DVD_LANGUAGE_KV_CACHE_GIB", raising=False)
    environ: dict[str, str] = {}
    set_cpu_kv_cache(LanguageServerSettings(), environ)
    assert environ["VLLM_CPU_KVCACHE_SPACE"] == str(LanguageServerSettings.model_fields["kv_cache_gib"].default)


def test_the_environment_setting_counts_as_given(monkeypatch):
    monkeypatch.setenv("DVD_LANGUAGE_KV_CACHE_GIB", "2")
    environ = {"VLLM_CPU_KVCACHE_SPACE": "1"}
    set_cpu_kv_cache(LanguageServerSettings(), environ)
    assert environ["VLLM_CPU_KVCACHE_SPACE"] == "2"


def _busy_loop_default(environ: dict[str, str]) -> float:
    """The default busy-poll of vLLM's shared-memory queue readers after DvD's plugin ran (in a fresh interpreter:
    the plugin patches vLLM process-wide)."""
    code = ("import inspect; from language_server.vllm_plugin import register; register(); "
            "from vllm.distributed.device_communicators.shm_broadcast import SpinCondition; "
            "print(inspect.signature(SpinCondition.__init__).parameters['busy_loop_s'].default)")
    env = {k: v for k, v in os.environ.items() if k != BUSY_POLL_ENV} | environ
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).parent.parent)
    assert done.returncode == 0, done.stderr[-2000:]
    return float(done.stdout.strip().splitlines()[-1])


def test_the_plugin_shortens_vllm_workers_busy_poll_only_in_the_language_servers_engine():
    assert _busy_loop_default({BUSY_POLL_ENV: "0.05"}) == 0.05
    assert _busy_loop_default({}) == 1  # any other vLLM in this environment keeps vLLM's own


def _collected_at_exit(setup: str, environ: dict[str, str]) -> bool:
    """Whether a fresh interpreter, after `setup`, still runs its last garbage collection on the way out: a
    reference cycle left in a module's globals is found only by that collection."""
    code = (f"import os\n{setup}\n"
            "class Loud:\n    def __del__(self, write=os.write):\n        write(1, b'collected\\n')\n"
            "cycle = [Loud()]\ncycle.append(cycle)\n")
    env = {k: v for k, v in os.environ.items() if k not in (BUSY_POLL_ENV, EXIT_FAST_ENV)} | environ
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).parent.parent)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.splitlines()[-1:] == ["collected"]


def test_the_language_servers_engine_processes_exit_without_a_last_garbage_collection():
    assert _collected_at_exit("", {})  # what the test detects
    assert not _collected_at_exit("from language_server.vllm_plugin import register; register()",
                                  {EXIT_FAST_ENV: "1"})


# vLLM's engine arguments on `dvd language-server` (language_server/arguments.py). Each test decides the platform
# itself (`cpu=`), so the GPU defaults are checked on this CPU machine too.


def _vllm_engine_arguments() -> dict[str, argparse.Action]:
    """vLLM's own engine arguments, as `vllm serve` adds them, by field name."""
    from vllm import AsyncEngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = AsyncEngineArgs.add_cli_args(FlexibleArgumentParser())
    return {action.dest: action for action in parser._actions if action.dest != "help"}


@pytest.fixture
def environment(monkeypatch, tmp_path):
    """No DVD_LANGUAGE_* variable but the model, an existing folder (vLLM resolves a missing one on the hub)."""
    for key in [k for k in os.environ if k.startswith(ENV_PREFIX)]:
        monkeypatch.delenv(key)
    monkeypatch.setenv(f"{ENV_PREFIX}MODEL", str(tmp_path))
    return monkeypatch


def test_the_language_server_takes_every_vllm_engine_argument_but_those_dvd_sets(environment):
    vllm_arguments = _vllm_engine_arguments()
    ours = {action.dest: action for action in build_parser(cpu=False)._actions}
    for dest, action in vllm_arguments.items():
        assert set(action.option_strings) <= {flag for a in ours.values() for flag in a.option_strings}, dest
        assert isinstance(ours[dest], Refused) == (dest in REFUSED), dest
    assert set(REFUSED) <= set(vllm_arguments)  # each refusal names a real engine argument
    counted = coverage()  # what the README quotes
    assert counted["vllm_engine_arguments"] == len(vllm_arguments)
    assert counted["dvd_settings_with_vllms_spelling"] == ["--reasoning-parser"]  # DvD's output parser
    assert counted["passed_to_the_engine"] == len(vllm_arguments) - len(REFUSED) - 1
    # Taken with vLLM's spelling, short flags and JSON / dotted forms included, and reaching the engine.
    engine = parse(["-tp", "2", "-pp", "2", "--data-parallel-size", "2", "--enable-expert-parallel",
                    "--distributed-executor-backend", "ray", "-q", "fp8", "--kv-cache-dtype", "fp8",
                    "--enable-chunked-prefill", "--max-num-batched-tokens", "4096",
                    "--speculative-config", '{"method": "ngram", "num_speculative_tokens": 3}',
                    "--compilation-config.mode", "3", "--no-enable-prefix-caching"], cpu=False).engine_args
    assert (engine.tensor_parallel_size, engine.pipeline_parallel_size, engine.data_parallel_size) == (2, 2, 2)
    assert engine.enable_expert_parallel and engine.distributed_executor_backend == "ray"
    assert (engine.quantization, engine.kv_cache_dtype) == ("fp8", "fp8")
    assert engine.enable_chunked_prefill and engine.max_num_batched_tokens == 4096
    assert engine.speculative_config == {"method": "ngram", "num_speculative_tokens": 3}
    assert engine.compilation_config.mode == 3 and engine.enable_prefix_caching is False


@pytest.mark.parametrize("dest", sorted(REFUSED))
def test_an_engine_argument_dvd_sets_is_refused_with_the_reason(dest, environment, capsys):
    flag = _vllm_engine_arguments()[dest].option_strings[0]
    with pytest.raises(SystemExit) as exit:
        parse([flag, "1"], cpu=True)
    assert exit.value.code == 2
    assert f"DvD sets this itself: {REFUSED[dest]}" in capsys.readouterr().err.replace("\n", " ")
    environment.setenv(ENGINE_ARGS_ENV, f"{flag} 1")  # the environment's way too
    with pytest.raises(SystemExit) as exit:
        parse([], cpu=True)
    assert exit.value.code == 2
    assert f"{ENGINE_ARGS_ENV}: error: argument {flag}" in capsys.readouterr().err


def test_on_cpu_the_defaults_are_dvds_cpu_ones_and_on_a_gpu_vllms_own(environment):
    from vllm import AsyncEngineArgs

    vllm_defaults = AsyncEngineArgs(model="m")
    on_gpu, on_cpu = parse([], cpu=False).engine_args, parse([], cpu=True).engine_args
    for name, cpu_value in CPU_DEFAULTS.items():
        assert getattr(on_cpu, name) == cpu_value
        assert getattr(on_gpu, name) == getattr(vllm_defaults, name) != cpu_value, name
    # vLLM's GPU defaults: its own memory fraction, CUDA graphs, chunked prefill where the model allows it.
    assert (on_gpu.gpu_memory_utilization, on_gpu.enforce_eager, on_gpu.enable_chunked_prefill) == (0.92, False, None)
    assert on_cpu.trust_remote_code and on_gpu.trust_remote_code  # custom-format checkpoints ship their code
    assert on_cpu.tensor_parallel_size == on_gpu.tensor_parallel_size == 1


@pytest.mark.slow  # runs `dvd language-server --help=…` as a process, as a user would
def test_the_help_shows_the_platforms_defaults_and_the_refused_arguments(environment, capsys):
    for cpu, shown in ((True, "--gpu-memory-utilization 0.2 --enforce-eager"), (False, "--trust-remote-code\n")):
        with pytest.raises(SystemExit) as exit:
            parse(["--help"], cpu=cpu)
        assert exit.value.code == 0
        text = capsys.readouterr().out
        assert f"({'CPU' if cpu else 'GPU'}) where they differ from vLLM's:" in text and shown in text
        assert " ".join("--" + name.replace("_", "-") for name in REFUSED) in text
    # Each argument's own help shows the platform's default. vLLM writes its arguments' help only when the
    # interpreter's command line asks for help, so this one runs as a user runs it, on this CPU machine.
    done = subprocess.run([sys.executable, "-m", "dvd.cli", "language-server", "--help=gpu-memory-utilization"],
                          capture_output=True, text=True, timeout=300, cwd=Path(__file__).parent.parent)
    assert done.returncode == 0, done.stderr[-2000:]
    text = " ".join(done.stdout.split())
    start = text.index("--gpu-memory-utilization GPU_MEMORY_UTILIZATION")
    assert text[text.index("(default:", start):].startswith("(default: 0.2)"), text[start:]


def test_engine_arguments_come_from_the_environment_and_a_flag_given_wins(environment, tmp_path):
    environment.setenv(ENGINE_ARGS_ENV, "--max-num-seqs 7 --max-model-len 1024 "
                                        "--speculative-config '{\"method\": \"ngram\", \"num_speculative_tokens\": 2}'")
    environment.setenv(f"{ENV_PREFIX}PORT", "7001")
    (tmp_path / "given").mkdir()
    arguments = parse(["--max-model-len", "2048", "--model", str(tmp_path / "given")], cpu=True)
    engine = arguments.engine_args
    assert (engine.max_num_seqs, engine.max_model_len) == (7, 2048)
    assert engine.speculative_config == {"method": "ngram", "num_speculative_tokens": 2}
    assert engine.enforce_eager  # the CPU default, given by neither
    assert (arguments.settings.port, arguments.settings.model) == (7001, str(tmp_path / "given"))  # DvD's rule
    assert engine.model == arguments.settings.model


def test_dvds_own_settings_keep_their_flags(environment):
    arguments = parse(["--port", "7002", "--feature-bind", "tcp://127.0.0.1:7003", "--feature-cache-mib", "3",
                       "--kv-cache-gib", "2", "--tool-call-parser", "hermes", "--reasoning-parser", "qwen3",
                       "--log-level", "debug"], cpu=True)
    settings = arguments.settings
    assert (settings.port, settings.feature_bind, settings.kv_cache_gib) == (7002, "tcp://127.0.0.1:7003", 2)
    assert settings.feature_cache_bytes == 3 << 20 and settings.reasoning_parser == "qwen3"
    assert arguments.log_level == "DEBUG" == arguments.engine_args.log_level  # vLLM's logging too
    assert arguments.engine_args.reasoning_parser == ""  # DvD's output parser; the engine's stays vLLM's default


@pytest.mark.parametrize("given, error", [
    ("--model other", "a DvD setting, not an engine argument: give it as DVD_LANGUAGE_MODEL"),
    ("--port 1", "unrecognized arguments: --port 1"),
])
def test_a_dvd_setting_in_the_engine_arguments_variable_is_refused(given, error, environment, capsys):
    environment.setenv(ENGINE_ARGS_ENV, given)
    with pytest.raises(SystemExit) as exit:
        parse([], cpu=True)
    assert exit.value.code == 2
    assert error in capsys.readouterr().err


def test_an_engine_argument_in_a_variable_of_its_own_is_refused_not_ignored(environment):
    environment.setenv(f"{ENV_PREFIX}MAX_MODEL_LEN", "4096")  # a setting before engine arguments were flags
    with pytest.raises(SystemExit, match=f"{ENV_PREFIX}MAX_MODEL_LEN is not read: .*"
                                         f"{ENGINE_ARGS_ENV}='--max-model-len VALUE'"):
        parse([], cpu=True)


def test_dvd_language_server_hands_vllms_flags_to_the_server(environment, tmp_path):
    import language_server.server
    from dvd.cli import app

    started = {}
    environment.setattr(language_server.server, "main", lambda settings, engine_args: started.update(
        settings=settings, engine_args=engine_args))
    result = CliRunner().invoke(app, ["language-server", "--model", str(tmp_path), "-tp", "2", "--quantization",
                                      "fp8", "--port", "7004"])
    assert result.exit_code == 0, result.output
    assert (started["settings"].model, started["settings"].port) == (str(tmp_path), 7004)
    assert (started["engine_args"].tensor_parallel_size, started["engine_args"].quantization) == (2, "fp8")


def test_dvd_up_hands_the_language_server_its_engine_arguments(monkeypatch, tmp_path):
    import launcher
    from dvd.cli import app

    stacks = []
    monkeypatch.setattr(launcher, "run_stack", lambda stack: stacks.append(stack) or 0)
    result = CliRunner().invoke(app, ["up", "--model", str(tmp_path), "--tensor-parallel-size", "2",
                                      "--port", "8123", "--enable-expert-parallel"])
    assert result.exit_code == 0, result.output
    (stack,) = stacks
    assert stack.gateway_port == 8123  # `dvd up`'s own flag, wherever it stands
    language = stack.commands()["language-server"]
    assert language[-3:] == ["--tensor-parallel-size", "2", "--enable-expert-parallel"]
    assert stack.up_command()[-3:] == language[-3:]  # a stack started as `dvd up` passes them on too
