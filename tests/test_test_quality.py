"""The suite's own rules, read from its source with `ast`, so that the next weak test is refused before it lands:

- an assert on a response object: `assert client.chat.completions.create(...)`, `assert stub.Health(...)`, or
  `assert reply` where `reply` holds such a call's result. Any answer is truthy; check what it says.
- a `pytest.raises` that does not pin the cause: an error that carries a message for the user (an API error, a
  gRPC status, the project's own errors) needs `match=`, or the caught exception bound (`as caught`) and read
  later in the test. Only the errors whose type is the whole story may go bare (`BARE_ERRORS`).
- an elapsed-time assert: a comparison on a difference of clock readings (`time.monotonic()`, `perf_counter()`,
  `time.time()`), directly or through a name that holds one. Wait on state with a deadline instead.

And the `slow` marker: tests/conftest.py refuses to let a test without it start a server process.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import server_command

TESTS = Path(__file__).parent

# Calls that ask a server for something, whose result is a response object: the OpenAI client's resource methods,
# an HTTP verb called on httpx or on a client, and a gRPC stub's methods (CapWords: `stub.Generate(...)`).
CLIENT_METHODS = {"create", "retrieve", "parse"}
HTTP_VERBS = {"get", "post", "put", "patch", "delete", "request", "stream", "options", "head"}
# Errors whose type says all there is to say: a cancelled task, a refused or timed-out connection, a missing
# key, file or module, an exhausted iterator.
BARE_ERRORS = {"CancelledError", "ConnectError", "ConnectTimeout", "ReadTimeout", "TimeoutError", "KeyError",
               "ConnectionRefusedError", "FileNotFoundError", "ImportError", "StopIteration", "StopAsyncIteration"}
CLOCKS = {"monotonic", "perf_counter", "time", "monotonic_ns", "perf_counter_ns", "time_ns"}


def _called_name(node: ast.AST) -> str | None:
    if isinstance(node, ast.Call):
        func = node.func
        return func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None
    return None


def _is_request(node: ast.AST) -> bool:
    name = _called_name(node)
    if name is None or not isinstance(node.func, ast.Attribute):
        return False
    receiver = ast.unparse(node.func.value).lower()
    return (name in CLIENT_METHODS or (name in HTTP_VERBS and ("httpx" in receiver or "client" in receiver))
            or (name[:1].isupper() and not name.isupper()))


def _conjuncts(test: ast.AST) -> list[ast.AST]:
    if isinstance(test, ast.BoolOp) and isinstance(test.op, ast.And):
        return [part for value in test.values for part in _conjuncts(value)]
    return [test]


def _assigned(function: ast.AST) -> dict[str, list[ast.AST]]:
    """Each simple name bound in `function` to the values it is given."""
    values: dict[str, list[ast.AST]] = {}
    for node in ast.walk(function):
        if isinstance(node, ast.Assign):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    values.setdefault(target.id, []).append(node.value)
        elif isinstance(node, ast.AnnAssign | ast.NamedExpr) and isinstance(node.target, ast.Name) and node.value:
            values.setdefault(node.target.id, []).append(node.value)
    return values


def truthy_response_asserts(function: ast.FunctionDef | ast.AsyncFunctionDef) -> list[int]:
    assigned = _assigned(function)
    lines = []
    for node in ast.walk(function):
        if not isinstance(node, ast.Assert):
            continue
        for part in _conjuncts(node.test):
            bare_response = isinstance(part, ast.Name) and any(_is_request(v) for v in assigned.get(part.id, ()))
            if _is_request(part) or bare_response:
                lines.append(node.lineno)
    return lines


def _error_names(node: ast.AST) -> list[str]:
    if isinstance(node, ast.Tuple):
        return [name for element in node.elts for name in _error_names(element)]
    if isinstance(node, ast.Attribute):
        return [node.attr]
    return [node.id] if isinstance(node, ast.Name) else ["?"]


def unexplained_raises(function: ast.FunctionDef | ast.AsyncFunctionDef) -> list[int]:
    """`with pytest.raises(E)` where E carries a message, without `match=` and without reading what it caught."""
    lines = []
    for node in ast.walk(function):
        if not isinstance(node, ast.With | ast.AsyncWith):
            continue
        for item in node.items:
            call = item.context_expr
            if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute) and call.func.attr == "raises"
                    and call.args):
                continue
            if any(k.arg == "match" for k in call.keywords) or set(_error_names(call.args[0])) <= BARE_ERRORS:
                continue
            bound = item.optional_vars.id if isinstance(item.optional_vars, ast.Name) else None
            read_later = bound is not None and any(
                isinstance(n, ast.Name) and n.id == bound and isinstance(n.ctx, ast.Load) and n.lineno > node.lineno
                for n in ast.walk(function))
            if not read_later:
                lines.append(node.lineno)
    return lines


def _reads_a_clock(node: ast.AST) -> bool:
    return any(_called_name(n) in CLOCKS and isinstance(n.func, ast.Attribute) for n in ast.walk(node)
               if isinstance(n, ast.Call))


def elapsed_time_asserts(function: ast.FunctionDef | ast.AsyncFunctionDef) -> list[int]:
    def is_elapsed(node: ast.AST, names: set[str]) -> bool:
        return any((isinstance(n, ast.BinOp) and isinstance(n.op, ast.Sub) and _reads_a_clock(n))
                   or (isinstance(n, ast.Name) and n.id in names) for n in ast.walk(node))

    elapsed: set[str] = set()
    for name, values in _assigned(function).items():
        if any(is_elapsed(v, set()) for v in values):
            elapsed.add(name)
    return [node.lineno for node in ast.walk(function) if isinstance(node, ast.Assert)
            and any(isinstance(n, ast.Compare) and is_elapsed(n, elapsed) for n in ast.walk(node.test))]


RULES = {"an assert on a response object": truthy_response_asserts,
         "pytest.raises without match= or a look at the caught error": unexplained_raises,
         "an assert on elapsed time": elapsed_time_asserts}


def violations(source: str, filename: str = "<test>") -> list[str]:
    """Each rule broken in a module-level function or a method (nested functions are read as part of these)."""
    tree = ast.parse(source, filename)
    functions = [node for node in tree.body if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)]
    functions += [node for cls in tree.body if isinstance(cls, ast.ClassDef) for node in cls.body
                  if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)]
    return [f"{filename}:{line} {function.name}: {rule}"
            for function in functions for rule, check in RULES.items() for line in sorted(set(check(function)))]


def test_the_suite_keeps_its_rules():
    found = [v for path in sorted(TESTS.glob("*.py")) for v in violations(path.read_text(), path.name)]
    assert found == []


WEAK = {
    "truthy-create": """
def test_it_answers(client):
    assert client.chat.completions.create(model="m", messages=[])
""",
    "truthy-grpc": """
def test_it_is_healthy(stub):
    assert stub.Health(request, timeout=5)
""",
    "truthy-name": """
def test_it_answers(client):
    reply = client.responses.create(model="m", input="hi")
    assert reply
""",
    "truthy-in-a-conjunction": """
def test_it_answers(client):
    assert counter() == 0 and client.chat.completions.create(model="m", messages=[])
""",
    "raises-api-error": """
def test_a_long_prompt_is_a_400(client):
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="m", messages=[])
""",
    "raises-caught-unread": """
def test_a_bad_choice_is_refused(stub):
    with pytest.raises(grpc.RpcError) as caught:
        stub.Generate(request)
""",
    "raises-own-error": """
def test_a_short_header_is_refused():
    with pytest.raises((FrameError, ValueError)):
        decode_header(b"")
""",
    "elapsed-inline": """
async def test_it_is_quick():
    started = time.monotonic()
    await work()
    assert time.monotonic() - started < 1.0
""",
    "elapsed-name": """
def test_it_waits():
    started = time.perf_counter()
    work()
    elapsed = time.perf_counter() - started
    assert 0.4 <= elapsed < 2.0
""",
}

SOUND = """
def test_it_answers(client, stub):
    reply = client.chat.completions.create(model="m", messages=[])
    assert reply.choices[0].finish_reason == "length"
    assert isinstance(reply, object) and reply.usage.completion_tokens == 4
    assert stub.Health(request).ready
    assert store.put(item) and not store.get("r")
    with pytest.raises(openai.BadRequestError, match="longer than"):
        client.chat.completions.create(model="m", messages=[])
    with pytest.raises(grpc.RpcError) as caught:
        stub.Generate(request)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(asyncio.CancelledError):
        await task
    deadline = time.monotonic() + 30
    assert store.expire(now=time.monotonic() + 100.0) == 1
"""


@pytest.mark.parametrize("source", WEAK.values(), ids=WEAK.keys())
def test_a_weak_test_is_refused(source):
    assert len(violations(source)) == 1, violations(source)


def test_sound_checks_pass():
    assert violations(SOUND) == []


@pytest.mark.parametrize("command", [
    [sys.executable, "-m", "dvd.cli", "language-server", "--model", "x"],
    ["/venv/bin/dvd", "up", "--model", "x"],
    [sys.executable, "-m", "benchmarks.vllm_cli", "serve", "--model", "x"],
    ["ip", "netns", "exec", "v", sys.executable, "-m", "dvd.cli", "gateway"],
])
def test_server_command_lines_are_recognised(command):
    assert server_command(command) == " ".join(command)


@pytest.mark.parametrize("command", [[sys.executable, "-m", "dvd.cli", "checkpoint", "x"], ["ip", "netns", "list"]])
def test_other_command_lines_are_not_servers(command):
    assert server_command(command) is None


def test_a_test_without_the_slow_marker_cannot_start_a_server():
    with pytest.raises(RuntimeError, match="starts a server without the `slow` marker"):
        subprocess.Popen([sys.executable, "-m", "dvd.cli", "gateway", "--help"])
