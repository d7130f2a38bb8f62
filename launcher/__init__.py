"""Starts DvD's servers as local processes and waits on them: one way for `dvd up`, the tests and the benchmarks.

Below the CLI and the benchmarks, beside the servers it starts, whose code it never imports (it runs them as
`python -m dvd.cli ...`): the standard library, httpx and grpc only.
"""

from launcher.ports import free_port
from launcher.processes import OFFLINE_ENV, Servers, http_ready
from launcher.stack import Stack, run_stack, secret_environment
from launcher.waiting import wait_until, wait_until_async

__all__ = ["OFFLINE_ENV", "Servers", "Stack", "free_port", "http_ready", "run_stack", "secret_environment",
           "wait_until", "wait_until_async"]
