"""Mutual TLS on the internal gRPC calls: a stack whose servers accept only clients with a certificate from
their CA, a gateway that presents one, and everything else refused at the handshake."""

from __future__ import annotations

import asyncio
import datetime
import importlib.util
import ipaddress
import shutil
import subprocess
from pathlib import Path

import grpc
import openai
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from conftest import data_url, free_port, make_image
from contracts.grpc_tls import TlsFiles, add_port, channel_credentials
from launcher import Stack
from proto import dvd_pb2, dvd_pb2_grpc

pytestmark = pytest.mark.slow

DAY = datetime.timedelta(days=1)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


class Authority:
    """A throw-away certificate authority that writes PEM files."""

    def __init__(self, folder: Path, name: str):
        self.folder, self.key = folder, ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        self.cert = (x509.CertificateBuilder().subject_name(_name(name)).issuer_name(_name(name))
                     .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
                     .not_valid_before(now - DAY).not_valid_after(now + DAY)
                     .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                     .sign(self.key, hashes.SHA256()))
        self.ca_file = folder / f"{name}-ca.pem"
        self.ca_file.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))

    def issue(self, name: str) -> tuple[Path, Path]:
        """A certificate for `name` (also valid for localhost and 127.0.0.1), for servers and clients."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        names = [x509.DNSName(name), x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        cert = (x509.CertificateBuilder().subject_name(_name(name)).issuer_name(self.cert.subject)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - DAY).not_valid_after(now + DAY)
                .add_extension(x509.SubjectAlternativeName(names), critical=False)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                      ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
                .sign(self.key, hashes.SHA256()))
        cert_file, key_file = self.folder / f"{name}.pem", self.folder / f"{name}-key.pem"
        cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        return cert_file, key_file


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pki")
    ours, rogue = Authority(folder, "dvd"), Authority(folder, "rogue")
    return {"ca": ours.ca_file, "server": ours.issue("servers"), "gateway": ours.issue("gateway"),
            "rogue": rogue.issue("intruder"), "rogue_ca": rogue.ca_file}


def tls_environment(pki) -> dict[str, str]:
    (server_cert, server_key), (gateway_cert, gateway_key) = pki["server"], pki["gateway"]
    env = {}
    for role in ("VISION", "LANGUAGE"):
        env |= {f"DVD_{role}_TLS_CERT_FILE": str(server_cert), f"DVD_{role}_TLS_KEY_FILE": str(server_key),
                f"DVD_{role}_TLS_CA_FILE": str(pki["ca"])}
    return env | {"DVD_GATEWAY_TLS_CERT_FILE": str(gateway_cert), "DVD_GATEWAY_TLS_KEY_FILE": str(gateway_key),
                  "DVD_GATEWAY_TLS_CA_FILE": str(pki["ca"]), "DVD_GATEWAY_TLS_SERVER_NAME": "servers"}


@pytest.fixture(scope="module")
def stack(tiny_checkpoints, pki, tmp_path_factory):
    stack = Stack(model=str(tiny_checkpoints["custom"]), gateway_port=free_port(), vision_port=free_port(),
                  language_port=free_port(), feature_port=free_port(), max_model_len=4096)
    logs = tmp_path_factory.mktemp("tls-logs")
    with stack.servers(logs, env=tls_environment(pki)).running(stack.ready()):
        yield stack, logs


def test_a_chat_completion_crosses_mutual_tls_to_both_servers(stack):
    stack, logs = stack
    client = openai.OpenAI(base_url=f"{stack.gateway_url}/v1", api_key="unused", max_retries=0)
    model = client.models.list().data[0].id
    picture = {"type": "image_url", "image_url": {"url": data_url(make_image(448, 448, 41))}}
    reply = client.chat.completions.create(model=model, max_tokens=4, extra_body={"ignore_eos": True}, messages=[
        {"role": "user", "content": [picture, {"type": "text", "text": "What is it?"}]}])
    assert reply.usage.completion_tokens == 4 and reply.usage.prompt_tokens_details.image_tokens == 256
    for server in ("vision-server", "language-server"):
        assert "(mtls)" in (logs / f"{server}.log").read_text(), server


def health(address: str, credentials: grpc.ChannelCredentials | None, stub_cls) -> grpc.StatusCode:
    async def call() -> grpc.StatusCode:
        options = [("grpc.ssl_target_name_override", "servers")]
        channel = (grpc.aio.secure_channel(address, credentials, options=options) if credentials
                   else grpc.aio.insecure_channel(address))
        async with channel:
            try:
                await stub_cls(channel).Health(dvd_pb2.HealthRequest(), timeout=5)
                return grpc.StatusCode.OK
            except grpc.aio.AioRpcError as exc:
                return exc.code()

    return asyncio.run(call())


def test_servers_refuse_plaintext_and_clients_without_a_certificate_from_their_ca(stack, pki):
    stack, _ = stack
    ca = pki["ca"].read_bytes()

    def client(cert_and_key, root=ca):
        cert, key = cert_and_key
        return grpc.ssl_channel_credentials(root, key.read_bytes(), cert.read_bytes())

    callers = {"gateway's certificate": client(pki["gateway"]), "plaintext": None,
               "no client certificate": grpc.ssl_channel_credentials(ca),
               "another CA's certificate": client(pki["rogue"])}
    for port, stub_cls in ((stack.vision_port, dvd_pb2_grpc.VisionServiceStub),
                           (stack.language_port, dvd_pb2_grpc.LanguageServiceStub)):
        codes = {name: health(f"127.0.0.1:{port}", credentials, stub_cls) for name, credentials in callers.items()}
        assert codes == {"gateway's certificate": grpc.StatusCode.OK, "plaintext": grpc.StatusCode.UNAVAILABLE,
                         "no client certificate": grpc.StatusCode.UNAVAILABLE,
                         "another CA's certificate": grpc.StatusCode.UNAVAILABLE}, (stub_cls.__name__, codes)
    # and the gateway refuses a server whose certificate its CA did not sign
    impostor = client(pki["gateway"], root=pki["rogue_ca"].read_bytes())
    assert health(f"127.0.0.1:{stack.vision_port}", impostor, dvd_pb2_grpc.VisionServiceStub) != grpc.StatusCode.OK


def test_the_container_health_check_calls_a_tls_server_with_its_own_certificate(stack, pki, monkeypatch):
    stack, _ = stack
    path = Path(__file__).parents[1] / "deploy" / "healthcheck.py"
    spec = importlib.util.spec_from_file_location("dvd_healthcheck", path)
    healthcheck = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(healthcheck)
    with pytest.raises(grpc.RpcError) as refused:  # plaintext, without the server's TLS settings: refused
        healthcheck.check("vision-server", stack.vision_port, timeout_s=2)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    for key, value in tls_environment(pki).items():
        monkeypatch.setenv(key, value)
    assert healthcheck.check("vision-server", stack.vision_port)
    assert healthcheck.check("language-server", stack.language_port)


def test_a_certificate_needs_its_key(pki):
    cert, key = pki["server"]
    assert TlsFiles(tls_cert_file=cert, tls_key_file=key).tls_ca_file is None
    with pytest.raises(ValueError, match="tls_cert_file and tls_key_file go together"):
        TlsFiles(tls_cert_file=cert)
    with pytest.raises(ValueError, match="tls_key_file"):
        TlsFiles(tls_cert_file=cert, tls_key_file=key.with_name("missing.pem"))
    _, other_key = pki["gateway"]

    async def listen() -> None:
        add_port(grpc.aio.server(), "127.0.0.1:0", TlsFiles(tls_cert_file=cert, tls_key_file=other_key))

    with pytest.raises(ValueError, match="does not go with"):  # refused at start-up, not at the first handshake
        asyncio.run(listen())


@pytest.mark.skipif(shutil.which("openssl") is None, reason="deploy/tls-certs.sh needs the openssl command")
def test_the_throw_away_certificates_script_makes_a_working_mutual_tls_pair(tmp_path):
    """deploy/tls-certs.sh's files, loaded by contracts.grpc_tls as the servers and the gateway load them: the
    gateway (name dvd-servers) and the health check (the server's own files, name localhost) get through."""
    subprocess.run([str(Path(__file__).parents[1] / "deploy" / "tls-certs.sh"), str(tmp_path / "tls")],
                   check=True, capture_output=True)
    servers, gateway = (TlsFiles(tls_cert_file=tmp_path / "tls" / side / "tls.crt",
                                 tls_key_file=tmp_path / "tls" / side / "tls.key",
                                 tls_ca_file=tmp_path / "tls" / side / "ca.crt") for side in ("servers", "gateway"))

    async def calls() -> dict[str, str]:
        echo = grpc.unary_unary_rpc_method_handler(lambda request, context: request)
        server = grpc.aio.server()
        server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("t.Echo", {"Call": echo})])
        port = free_port()
        assert add_port(server, f"127.0.0.1:{port}", servers) == "mtls"
        await server.start()
        results = {}
        for caller, credentials, name in (("gateway", channel_credentials(gateway), "dvd-servers"),
                                          ("health check", channel_credentials(servers), "localhost"),
                                          ("wrong name", channel_credentials(gateway), "dvd-gateway")):
            options = [("grpc.ssl_target_name_override", name)]
            async with grpc.aio.secure_channel(f"127.0.0.1:{port}", credentials, options=options) as channel:
                try:
                    await channel.unary_unary("/t.Echo/Call")(b"ping", timeout=5)
                    results[caller] = "ok"
                except grpc.aio.AioRpcError as exc:
                    results[caller] = exc.code().name
        await server.stop(None)
        return results

    assert asyncio.run(calls()) == {"gateway": "ok", "health check": "ok", "wrong name": "UNAVAILABLE"}


class ReadyVision(dvd_pb2_grpc.VisionServiceServicer):
    async def Health(self, request, context):
        return dvd_pb2.HealthResponse(ready=True)


def install(folder: Path, authority: Authority, name: str, key_of: str | None = None) -> TlsFiles:
    """Copy a certificate for `name` (and its key, or `key_of`'s: a mismatched pair) and the CA into `folder`."""
    folder.mkdir(exist_ok=True)
    cert, key = authority.issue(name)
    if key_of is not None:
        key = authority.issue(key_of)[1]
    for source, target in ((cert, "tls.crt"), (key, "tls.key"), (authority.ca_file, "ca.crt")):
        (folder / target).write_bytes(source.read_bytes())
    return TlsFiles(tls_cert_file=folder / "tls.crt", tls_key_file=folder / "tls.key", tls_ca_file=folder / "ca.crt")


async def handshake(files: TlsFiles, address: str) -> str:
    """A call on a connection of its own (no shared subchannel), with `files` as the client's: "ok" or the
    status of its failure."""
    options = [("grpc.ssl_target_name_override", "servers"), ("grpc.use_local_subchannel_pool", 1)]
    async with grpc.aio.secure_channel(address, channel_credentials(files), options=options) as channel:
        try:
            await dvd_pb2_grpc.VisionServiceStub(channel).Health(dvd_pb2.HealthRequest(), timeout=5)
            return "ok"
        except grpc.aio.AioRpcError as exc:
            return exc.code().name


def test_rotated_certificates_are_picked_up_without_a_restart(tmp_path, caplog):
    """Both sides move from one CA to another in place: the server's next handshake and the gateway's next
    health check use the new files; a half-written rotation (certificate and key that do not match) leaves
    the previous files in use on both sides."""
    from gateway.pools import VisionPool

    for name in ("old", "new"):
        (tmp_path / name).mkdir()
    old, new = Authority(tmp_path / "old", "old"), Authority(tmp_path / "new", "new")
    servers, gateway = install(tmp_path / "servers", old, "servers"), install(tmp_path / "gateway", old, "gateway")
    old_gateway = install(tmp_path / "old-client", old, "gateway")  # clients of a connection of their own
    new_gateway = install(tmp_path / "new-client", new, "gateway")

    async def scenario() -> None:
        server = grpc.aio.server()
        dvd_pb2_grpc.add_VisionServiceServicer_to_server(ReadyVision(), server)
        address = f"127.0.0.1:{free_port()}"
        add_port(server, address, servers)
        await server.start()
        pool = VisionPool([address], tls=gateway, server_name="servers")
        try:
            assert await pool.check(5) == 1
            install(tmp_path / "servers", new, "servers")
            assert await handshake(old_gateway, address) == "UNAVAILABLE"  # the server already uses the new CA
            channel = pool.backends[0].channel
            install(tmp_path / "gateway", new, "gateway")
            assert await pool.check(5) == 1 and pool.backends[0].channel is not channel  # new channel, new files
            assert await handshake(new_gateway, address) == "ok"

            channel = pool.backends[0].channel
            install(tmp_path / "servers", new, "servers", key_of="stray")
            install(tmp_path / "gateway", new, "gateway", key_of="stray")
            assert await pool.check(5) == 1 and pool.backends[0].channel is channel  # kept
            assert await handshake(old_gateway, address) == "UNAVAILABLE"
            assert await handshake(new_gateway, address) == "ok"  # the server kept its previous (new-CA) files
        finally:
            await pool.close()
            await server.stop(None)

    asyncio.run(scenario())
    warnings = [r.getMessage() for r in caplog.records if "did not load" in r.getMessage()]
    assert any("servers keep the previous ones" in w for w in warnings)  # the gateway's pool
    assert any("the previous ones stay in use" in w for w in warnings)  # the server's fetcher
