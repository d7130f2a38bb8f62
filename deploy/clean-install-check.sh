#!/usr/bin/env bash
# The README's install on a clean machine, simulated: a fresh clone of HEAD, a fresh venv, pip's machine
# configuration and find-links ignored, torch only from TORCH_INDEX_URL. `make` installs and writes the tiny
# checkpoint, vLLM's own `vllm` command runs, `make up` serves, one chat completion with an image goes through
# the gateway (deploy/chat_with_image.py); then the stack stops and the clone is removed, on failure too.
#
#   deploy/clean-install-check.sh
#   TORCH_WHEEL=/path/to/torch-2.13.0+cpu-...whl deploy/clean-install-check.sh   # where PyTorch's index is out of reach
#
# Settings (environment):
#   TORCH_INDEX_URL  the index that holds torch==2.13.0+cpu                        [https://download.pytorch.org/whl/cpu]
#   TORCH_WHEEL      a local torch wheel: a file:// stand-in index holding only it is used instead
#   PORT             the gateway's port (the other servers take `dvd up`'s default ports)     [8000]
#   KEEP=1           keep the clone and its venv (printed at the end)
set -Eeuo pipefail
cd "$(dirname "$0")/.."

TORCH_INDEX_URL=${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}
TORCH_WHEEL=${TORCH_WHEEL:-}
PORT=${PORT:-8000}
KEEP=${KEEP:-0}
WORK=$(mktemp -d /var/tmp/dvd-clean-install.XXXXXX)
UP_PID=""

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    set +e
    if [[ -n $UP_PID ]]; then
        kill -TERM -- "-$UP_PID" 2>/dev/null  # make and `dvd up`, which stops its servers
        for _ in $(seq 60); do kill -0 -- "-$UP_PID" 2>/dev/null || break; sleep 1; done
        kill -KILL -- "-$UP_PID" 2>/dev/null
    fi
    if ((rc)) && [[ -f $WORK/up.log ]]; then echo "--- last lines of make up"; tail -40 "$WORK/up.log"; fi
    if [[ $KEEP == 1 ]]; then echo "kept $WORK"; else rm -rf "$WORK"; fi
    echo "clean-install check: $( ((rc)) && echo FAILED || echo passed)"
    exit "$rc"
}
trap cleanup EXIT INT TERM

if [[ -n $TORCH_WHEEL ]]; then
    mkdir -p "$WORK/index/simple/torch"
    wheel=$(realpath "$TORCH_WHEEL")
    echo "<a href=\"file://$wheel#sha256=$(sha256sum "$wheel" | cut -d' ' -f1)\">$(basename "$wheel")</a>" \
        > "$WORK/index/simple/torch/index.html"
    TORCH_INDEX_URL=file://$WORK/index/simple
fi

git clone -q . "$WORK/dvd"
cd "$WORK/dvd"
echo "=== $(date -u +%T) install: HEAD $(git rev-parse --short HEAD), torch from $TORCH_INDEX_URL"
# What a user's machine lacks: pip's configuration files (here: find-links to a local torch wheel, local indexes).
clean_pip=(env -u PIP_FIND_LINKS -u PIP_INDEX_URL -u PIP_EXTRA_INDEX_URL -u PIP_CONSTRAINT PIP_CONFIG_FILE=/dev/null)
start=$(date +%s)
"${clean_pip[@]}" make checkpoint TORCH_INDEX_URL="$TORCH_INDEX_URL"
echo "installed in $(($(date +%s) - start)) s: $(.venv/bin/pip list 2>/dev/null | grep -E '^(torch|vllm)' | xargs)"
vllm_version=$(.venv/bin/vllm --version 2>/dev/null | tail -1)  # vLLM's own command (dvd/site_hook.py)
echo "vllm --version: $vllm_version"

echo "=== $(date -u +%T) make up"
setsid "${clean_pip[@]}" make up PORT="$PORT" TORCH_INDEX_URL="$TORCH_INDEX_URL" > "$WORK/up.log" 2>&1 &
UP_PID=$!
for _ in $(seq 300); do
    curl -fs "http://127.0.0.1:$PORT/health" >/dev/null && break
    kill -0 "$UP_PID" 2>/dev/null || { echo "make up exited"; exit 1; }
    sleep 1
done
curl -fsS "http://127.0.0.1:$PORT/health"; echo

echo "=== $(date -u +%T) one chat completion with an image"
.venv/bin/python deploy/chat_with_image.py "http://127.0.0.1:$PORT/v1"
