#!/usr/bin/env bash
# The GPU half of docs/adaptive.md: one H200, sarathi x1 against TetriInfer (1 prefill + 1 decode
# instance on the same GPU) through the real serving path, with the simulator's prediction of
# each run. Usage on the device (wheels carried in .whl, see the device tool's README):
#   bash docs/adaptive/gpu_run.sh OUT PART      # PART: profile | a | b | c (TetriInfer MPS alone)
set -euo pipefail
OUT=$1; PART=$2
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TETRIINFER_COMMIT=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
export TETRIINFER_DATA_DIR=${TETRIINFER_DATA_DIR:-$PWD/.bench_data/data}
COMMON="--model llama3-8b --dtype bfloat16 --chunk-size 2048 --max-model-len 8192 --predictor none"
PROFILE=docs/benchmarks/profile-h200-llama3-8b.json
[ -f "$OUT/profile-h200-llama3-8b.json" ] && PROFILE=$OUT/profile-h200-llama3-8b.json
case $PART in
profile)
  python3 -m tetriinfer.cli profile --model llama3-8b --device cuda --dtype bfloat16 --gpu h200 \
    --chunk-size 2048 --chunk-tokens 256,512,1024,2048,4096 --context-tokens 0,1024,4096 \
    --batch-sizes 1,8,32,64,128,256 --context-per-seq 128,512,1024 --out "$OUT/profile-h200-llama3-8b.json" ;;
a) SYSTEMS=(--system "sarathi-x1=--mode colocated --instances 1 --baseline sarathi --device cuda:0 --num-blocks 40000"
            --system "tetriinfer-1P1D-mps=--prefill-instances 1 --decode-instances 1 --device cuda:0 --num-blocks 20000 --mps-sm-shares 40,60") ;;
c) SYSTEMS=(--system "tetriinfer-1P1D-mps=--prefill-instances 1 --decode-instances 1 --device cuda:0 --num-blocks 20000 --mps-sm-shares 40,60") ;;
b) SYSTEMS=(--system "tetriinfer-1P1D-timesliced=--prefill-instances 1 --decode-instances 1 --device cuda:0 --num-blocks 20000"
            --system "paper-1P1D-mps=--policy paper --prefill-instances 1 --decode-instances 1 --device cuda:0 --num-blocks 20000 --mps-sm-shares 40,60") ;;
esac
if [ "$PART" != profile ]; then
  python3 scripts/serve_bench.py --out "$OUT/$PART" --common "$COMMON" "${SYSTEMS[@]}" \
    --runs "${RUNS:-mixed@6,mixed@12,conversation@24}" --num-requests "${REQUESTS:-160}" \
    --warmup-requests 32 --profile "$PROFILE" 2>&1 | tee "$OUT/$PART.log"
fi
