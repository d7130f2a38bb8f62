"""Container health check for any DvD role: exit 0 when the server in this container answers ready.

The role and port come from the arguments (`healthcheck.py gateway 8000`) or, by default, from the
`dvd` process running in the container, so one image-level HEALTHCHECK serves all three roles.
The gateway is checked through HTTP `/health`; the vision and language servers through their gRPC
`Health` RPC (proto/dvd.proto), which answers ready once the model is loaded. A server serving TLS
(`DVD_<ROLE>_TLS_CERT_FILE`) is called over TLS with its own certificate and key as the client's, checked
against its `TLS_CA_FILE` (or its own certificate when it has no CA), under the name
`DVD_HEALTHCHECK_TLS_SERVER_NAME` (default `localhost`).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROLES = {"gateway": 8000, "vision-server": 50051, "language-server": 50061}


def role_and_port(argv: list[str]) -> tuple[str, int]:
    """The role and port of a `dvd <role> ... --port N` command line (`dvd up` is judged by its gateway)."""
    role = next(arg for arg in argv if arg in ROLES)
    port = ROLES[role]
    for i, arg in enumerate(argv):
        if arg == "--port" and i + 1 < len(argv):
            port = int(argv[i + 1])
        elif arg.startswith("--port="):
            port = int(arg.split("=", 1)[1])
    return role, port


def running_server() -> tuple[str, int]:
    """Find the dvd server in this container's process list; prefer the gateway (it covers `dvd up`)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            argv = cmdline.read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if any("dvd" in arg for arg in argv[:4]) and any(arg in ROLES for arg in argv):
            found.append(role_and_port(argv))
    if not found:
        raise SystemExit("no dvd server process in this container")
    return min(found, key=lambda rp: rp[0] != "gateway")


def check(role: str, port: int, host: str = "127.0.0.1", timeout_s: float = 4.0) -> bool:
    if role == "gateway":
        import httpx

        return httpx.get(f"http://{host}:{port}/health", timeout=timeout_s).status_code == 200
    from proto import dvd_pb2, dvd_pb2_grpc

    stub_cls = dvd_pb2_grpc.VisionServiceStub if role == "vision-server" else dvd_pb2_grpc.LanguageServiceStub
    with channel_to(role, f"{host}:{port}") as channel:
        return stub_cls(channel).Health(dvd_pb2.HealthRequest(), timeout=timeout_s).ready


def channel_to(role: str, address: str):
    """A plaintext channel, or a TLS one when the server in this container serves TLS."""
    import grpc

    from contracts.grpc_tls import TlsFiles, channel_credentials

    prefix = "DVD_VISION_" if role == "vision-server" else "DVD_LANGUAGE_"
    cert, key, ca = (os.environ.get(prefix + name) for name in ("TLS_CERT_FILE", "TLS_KEY_FILE", "TLS_CA_FILE"))
    if not cert:
        return grpc.insecure_channel(address)
    credentials = channel_credentials(TlsFiles(tls_cert_file=cert, tls_key_file=key, tls_ca_file=ca or cert))
    name = os.environ.get("DVD_HEALTHCHECK_TLS_SERVER_NAME", "localhost")
    return grpc.secure_channel(address, credentials, options=[("grpc.ssl_target_name_override", name)])


def main(argv: list[str]) -> int:
    role, port = (argv[0], int(argv[1])) if len(argv) >= 2 else running_server()
    try:
        ready = check(role, port)
    except Exception as exc:  # any failure to answer is "unhealthy", with the reason in `docker inspect`
        print(f"{role} on :{port} did not answer: {exc}")
        return 1
    print(f"{role} on :{port} {'ready' if ready else 'not ready'}")
    return 0 if ready else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
