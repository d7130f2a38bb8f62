#!/usr/bin/env bash
# The CPU image built and run for real: build deploy/Dockerfile.cpu on a local Debian base, start the compose
# cpu profile's three servers from it on the host network (deploy/docker-compose.host.yml), wait for their
# health checks, send one chat completion with an image through the containerized gateway (the official
# openai client, deploy/chat_with_image.py), then remove the containers, the pod and the image, on failure too.
#
#   make image-check                       # or: deploy/image-check.sh
#   TORCH_WHEEL=/path/to/torch-2.13.0+cpu-...whl PODMAN_RUNTIME=runc make image-check
#
# Needs root, podman (>= 4), debootstrap (only while the base is missing) and a python with openai and pillow
# (PYTHON; `make` passes the project's venv). Settings (environment):
#   BASE_IMAGE       local base, built by debootstrap when missing and kept   [localhost/dvd-base:bookworm]
#   DEBIAN_MIRROR    where debootstrap and the image's apt-get fetch from      [http://deb.debian.org/debian]
#   IMAGE            the image built, run and removed                          [localhost/dvd:cpu-check]
#   TORCH_INDEX_URL  the index that holds torch==2.13.0+cpu                    [https://download.pytorch.org/whl/cpu]
#   TORCH_WHEEL      a local torch wheel: serve it as a stand-in index on 127.0.0.1 and use that instead
#   CA_BUNDLE        mounted into the build for pip (PIP_CERT), e.g. for a TLS-intercepting proxy
#                    [/etc/ssl/certs/ca-certificates.crt when it exists]
#   PODMAN_RUNTIME   OCI runtime for podman, e.g. runc where crun refuses a hybrid cgroup layout  [podman's]
#   KEEP_IMAGE=1     keep the built image;  KEEP_BASE=0  remove the base too
#   HEALTH_TIMEOUT   seconds to wait for all three servers to be healthy      [600]
#   CACHE_DIR        podman-compose's venv and the stand-in index              [/var/tmp/dvd-image-check]
set -Eeuo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-.venv/bin/python}
BASE_IMAGE=${BASE_IMAGE:-localhost/dvd-base:bookworm}
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
IMAGE=${IMAGE:-localhost/dvd:cpu-check}
TORCH_INDEX_URL=${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}
TORCH_WHEEL=${TORCH_WHEEL:-}
CA_BUNDLE=${CA_BUNDLE-$([[ -f /etc/ssl/certs/ca-certificates.crt ]] && echo /etc/ssl/certs/ca-certificates.crt)}
PODMAN_RUNTIME=${PODMAN_RUNTIME:-}
KEEP_IMAGE=${KEEP_IMAGE:-0}
KEEP_BASE=${KEEP_BASE:-1}
HEALTH_TIMEOUT=${HEALTH_TIMEOUT:-600}
CACHE_DIR=${CACHE_DIR:-/var/tmp/dvd-image-check}
PODMAN_COMPOSE_VERSION=1.6.0  # >= 1.1 for `!reset` in the host override
PROJECT=dvd-image-check
SERVICES=(vision-cpu language-cpu gateway-cpu)

PODMAN=(podman ${PODMAN_RUNTIME:+--runtime "$PODMAN_RUNTIME"})
COMPOSE=("$CACHE_DIR/podman-compose/bin/podman-compose" ${PODMAN_RUNTIME:+--podman-args "--runtime $PODMAN_RUNTIME"}
         -p "$PROJECT" -f deploy/docker-compose.yml -f deploy/docker-compose.host.yml --profile cpu)

# ------------------------------------------------------------------ phases and their wall times
PHASES=() PHASE="" PHASE_T0=0 CHECK_T0=$(date +%s)
phase() {
    local now
    now=$(date +%s)
    [[ -n $PHASE ]] && PHASES+=("$(printf '%-10s %5d s' "$PHASE" $((now - PHASE_T0)))")
    PHASE=$1 PHASE_T0=$now
    echo "=== $(date -u +%H:%M:%S) $1"
}

without_systemd_noise() {  # podman without systemd logs that it cannot add health-check timers; we run them
    "$@" 2>&1 | { grep -v "unable to get systemd connection" || true; }
}

# ------------------------------------------------------------------ cleanup, on success and failure
INDEX_PID="" STARTED=0
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    set +e
    phase cleanup
    if ((STARTED)); then
        if ((rc)); then
            for service in "${SERVICES[@]}"; do
                echo "--- last log lines of $service"
                "${PODMAN[@]}" logs --tail 40 "${PROJECT}_${service}_1" 2>&1
            done
        fi
        without_systemd_noise "${COMPOSE[@]}" down | { grep -v "no container with name or ID" || true; }
    fi
    # Whatever `down` left: containers of the project, its pod.
    "${PODMAN[@]}" ps -aq --filter "label=io.podman.compose.project=$PROJECT" | xargs -r "${PODMAN[@]}" rm -f
    "${PODMAN[@]}" pod exists "pod_$PROJECT" 2>/dev/null && "${PODMAN[@]}" pod rm -f "pod_$PROJECT"
    [[ -n $INDEX_PID ]] && kill "$INDEX_PID" 2>/dev/null
    [[ $KEEP_IMAGE == 1 ]] || "${PODMAN[@]}" rmi --ignore "$IMAGE" >/dev/null
    [[ $KEEP_BASE == 1 ]] || "${PODMAN[@]}" rmi --ignore "$BASE_IMAGE" >/dev/null
    echo "left: containers [$("${PODMAN[@]}" ps -aq --filter "label=io.podman.compose.project=$PROJECT" | xargs)]" \
         "pods [$("${PODMAN[@]}" pod ls -q --filter "name=pod_$PROJECT" | xargs)]" \
         "images [$("${PODMAN[@]}" images --format '{{.Repository}}:{{.Tag}}' | grep -E "^(${IMAGE}|${BASE_IMAGE})$" | xargs)]"
    phase end
    echo "=== phase times"
    printf '%s\n' "${PHASES[@]}"
    printf '%-10s %5d s\n' total $(($(date +%s) - CHECK_T0))
    if ((rc)); then echo "IMAGE CHECK FAILED (exit $rc)"; else echo "IMAGE CHECK PASSED"; fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_ports() {  # N free TCP ports on 127.0.0.1
    "$PYTHON" -c "
import socket, sys
socks = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks: s.bind(('127.0.0.1', 0))
print(' '.join(str(s.getsockname()[1]) for s in socks))" "$1"
}

at_most() {  # the smaller of a number and a limit that may be "unlimited"
    if [[ $2 == unlimited ]] || (($1 <= $2)); then echo "$1"; else echo "$2"; fi
}

# ------------------------------------------------------------------ tools
phase tools
[[ $(id -u) == 0 ]] || { echo "run as root: debootstrap, and podman with host networking" >&2; exit 1; }
"$PYTHON" -c "import openai, PIL" || { echo "PYTHON=$PYTHON needs openai and pillow (the project's venv)" >&2; exit 1; }
"${PODMAN[@]}" --version
if [[ ! -x $CACHE_DIR/podman-compose/bin/podman-compose ]]; then
    "$PYTHON" -m venv "$CACHE_DIR/podman-compose"
    "$CACHE_DIR/podman-compose/bin/pip" install -q "podman-compose==$PODMAN_COMPOSE_VERSION"
fi
"${COMPOSE[0]}" --version | head -1

# ------------------------------------------------------------------ base image
phase base
if "${PODMAN[@]}" image exists "$BASE_IMAGE"; then
    echo "base $BASE_IMAGE: cached"
else
    # Debian bookworm, minimal, with what both stages of Dockerfile.cpu expect of python:3.11-slim-bookworm
    # (python as `python`, venv) and the runtime stage's packages (so its apt-get finds them installed).
    rootfs=$(mktemp -d "${TMPDIR:-/var/tmp}/dvd-base.XXXXXX")
    debootstrap --variant=minbase --include=python3,python3-venv,python-is-python3,libnuma1,libgomp1,tini \
        bookworm "$rootfs" "$DEBIAN_MIRROR" | { grep -E "^(I: Base|E:|W:)" || true; }
    chroot "$rootfs" apt-get clean
    rm -rf "$rootfs"/var/lib/apt/lists/*
    tar -C "$rootfs" -c . | "${PODMAN[@]}" import --change 'ENV LANG=C.UTF-8' \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'CMD ["bash"]' - "$BASE_IMAGE" >/dev/null
    rm -rf "$rootfs"
fi
"${PODMAN[@]}" images --format '{{.Repository}}:{{.Tag}} {{.Size}}' "$BASE_IMAGE"

# ------------------------------------------------------------------ build
phase build
if [[ -n $TORCH_WHEEL ]]; then
    # PEP 503 stand-in for the CPU index: simple/torch/ lists the one wheel, served on loopback.
    index=$CACHE_DIR/torch-index
    rm -rf "$index" && mkdir -p "$index/simple/torch"
    wheel=$(basename "$TORCH_WHEEL")
    ln -s "$(realpath "$TORCH_WHEEL")" "$index/simple/torch/$wheel"
    echo "<!DOCTYPE html><html><body><a href=\"${wheel//+/%2B}\">$wheel</a></body></html>" \
        >"$index/simple/torch/index.html"
    read -r port < <(free_ports 1)
    "$PYTHON" -m http.server --bind 127.0.0.1 --directory "$index" "$port" >"$CACHE_DIR/torch-index.log" 2>&1 &
    INDEX_PID=$!
    TORCH_INDEX_URL=http://127.0.0.1:$port/simple
    for _ in $(seq 50); do curl -fs "$TORCH_INDEX_URL/torch/" >/dev/null && break; sleep 0.1; done
    echo "torch from $TORCH_WHEEL, served as $TORCH_INDEX_URL"
fi
NOFILE=$(at_most 16384 "$(ulimit -Hn)") NPROC=$(at_most 8192 "$(ulimit -Hu)")
build=(--network host --pull=never --format docker --layers=false
       --ulimit "nofile=$NOFILE:$NOFILE" --ulimit "nproc=$NPROC:$NPROC"
       --ignorefile deploy/Dockerfile.cpu.dockerignore
       --build-arg "BASE_IMAGE=$BASE_IMAGE" --build-arg "TORCH_INDEX_URL=$TORCH_INDEX_URL")
if [[ -n $CA_BUNDLE ]]; then
    build+=(--volume "$CA_BUNDLE:/run/dvd-build-ca.crt:ro" --build-arg PIP_CERT=/run/dvd-build-ca.crt)
fi
# pip's download progress is noise in a log; everything else is kept.
"${PODMAN[@]}" build "${build[@]}" -f deploy/Dockerfile.cpu -t "$IMAGE" . 2>&1 \
    | { grep --line-buffered -vE "^\s+(━|Downloading|Using cached)|^Copying (blob|config)" || true; }
"${PODMAN[@]}" images --format '{{.Repository}}:{{.Tag}} {{.Size}}' "$IMAGE"
# The entrypoint runs: dvd's CLI imports in the image, as its user.
help=$(without_systemd_noise "${PODMAN[@]}" run --rm --network host \
    --ulimit "nofile=$NOFILE:$NOFILE" --ulimit "nproc=$NPROC:$NPROC" "$IMAGE" --help) || { echo "$help" >&2; exit 1; }
echo "entrypoint: $(grep -m1 Usage <<<"$help")"

# ------------------------------------------------------------------ up, on the host network
phase up
read -r gw vision language feature vmetrics lmetrics < <(free_ports 6)
export DVD_CPU_IMAGE=$IMAGE DVD_HOST_NOFILE=$NOFILE DVD_HOST_NPROC=$NPROC \
    DVD_HOST_GATEWAY_PORT=$gw DVD_HOST_VISION_PORT=$vision DVD_HOST_LANGUAGE_PORT=$language \
    DVD_HOST_FEATURE_PORT=$feature DVD_HOST_VISION_METRICS_PORT=$vmetrics DVD_HOST_LANGUAGE_METRICS_PORT=$lmetrics
STARTED=1
without_systemd_noise "${COMPOSE[@]}" up -d --no-build "${SERVICES[@]}"
deadline=$(($(date +%s) + HEALTH_TIMEOUT))
for service in "${SERVICES[@]}"; do
    container=${PROJECT}_${service}_1
    # podman without systemd runs no health-check timers: run the image's HEALTHCHECK until it passes.
    # Its start period does not apply here; the deadline does.
    until "${PODMAN[@]}" healthcheck run "$container" >/dev/null 2>&1; do
        read -r state restarts < <("${PODMAN[@]}" inspect -f '{{.State.Status}} {{.RestartCount}}' "$container")
        if [[ $state != running || $restarts != 0 ]]; then
            echo "$service: $state, restarted $restarts times" >&2
            exit 1
        fi
        if (($(date +%s) > deadline)); then
            echo "$service: not healthy after ${HEALTH_TIMEOUT}s" >&2
            exit 1
        fi
        sleep 3
    done
    echo "$service healthy after $(($(date +%s) - PHASE_T0)) s"
done
"${PODMAN[@]}" ps --filter "label=io.podman.compose.project=$PROJECT" --format '{{.Names}}  {{.Status}}  {{.Command}}'

# ------------------------------------------------------------------ one chat completion with an image
phase request
"$PYTHON" deploy/chat_with_image.py "http://127.0.0.1:$gw/v1"
echo "vision metrics: $(curl -fs "http://127.0.0.1:$vmetrics/metrics" | grep -E '^dvd_vision_tiles_total' | xargs)"
echo "language metrics: $(curl -fs "http://127.0.0.1:$lmetrics/metrics" \
    | grep -E '^dvd_language_features_received_total' | xargs)"
