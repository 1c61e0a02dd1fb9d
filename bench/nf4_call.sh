#!/usr/bin/env bash
# One device call (one H100 or H200) for the read-once NF4 kernel (kd.generate.nf4_matmul), everything compared in
# the same call:
#   1. bench/nf4_mm_bench.py: one 72B layer's products at M = 1, 16, 128, 512 -- fused kernel, auto (the decoder's
#      route), dequantise + cuBLAS, bf16 cuBLAS -- against the memory and compute floors (SWEEP=1: every tile);
#   2. ncu: DRAM bytes read and written by each tuned fused product (when ncu is on the machine);
#   3. bench/decode_bench.py: whole decode steps at batches 1, 128, 512, 80 layers extrapolated from LAYERS (default
#      2,6): the decoder's auto route ("ours"), the fused kernel at every batch ("fused"), dequantise + cuBLAS
#      ("dequant"), and transformers + bitsandbytes NF4 ("hf"; BENCH_SKIP=hf leaves it out);
#   4. greedy tokens, fused vs dequantise + cuBLAS, GREEDY (default 64 prompts, 32 tokens) at real width.
# Needs carry [".whl", ".whlb"] (docs/benchmarks.md's wheels + bitsandbytes==0.50.2 manylinux x86_64; ~55 MiB).
#   device tool: bash bench/nf4_call.sh        (~8 min)
set -o pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl .whlb/*.whl || exit 1
rm -rf /tmp/site/recipes  # torchtune's top-level `recipes` package would shadow ./recipes
export PYTHONPATH=$PWD:/tmp/site
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.limit --format=csv,noheader | tee "$OUT/gpu.txt"
SW=""; [ -n "${SWEEP:-}" ] && SW="--sweep"
[ -n "${SKIP_PRODUCTS:-}" ] || timeout "${PRODUCTS_TIMEOUT:-240}" python3 bench/nf4_mm_bench.py $SW --out "$OUT" \
    > "$OUT/nf4_mm_bench.log" 2>&1
echo "products rc=$?"
grep '"layer"' "$OUT/nf4_mm_bench.log" | cut -c1-330
NCU=$(command -v ncu || ls /usr/local/cuda*/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
if [ -n "$NCU" ] && [ -f "$OUT/nf4_mm_bench.json" ] && [ -z "${SKIP_NCU:-}" ]; then
  KD_NF4_TUNE=0 timeout 150 "$NCU" --metrics dram__bytes_read.sum,dram__bytes_write.sum,gpu__time_duration.sum \
      --kernel-name regex:_nf4_mm_kernel --csv python3 bench/nf4_mm_bench.py --ncu-configs "$OUT/nf4_mm_bench.json" \
      > "$OUT/ncu.csv" 2> "$OUT/ncu.err"
  echo "ncu rc=$? ($NCU)"; grep -c dram__bytes_read "$OUT/ncu.csv"; tail -3 "$OUT/ncu.err"
  if [ -n "${NCU_DETAIL:-}" ]; then  # where the time goes in one product (e.g. NCU_DETAIL=gate:16)
    KD_NF4_TUNE=0 timeout 120 "$NCU" --set detailed --kernel-name regex:_nf4_mm_kernel python3 bench/nf4_mm_bench.py \
        --ncu-configs "$OUT/nf4_mm_bench.json" --ncu-only "$NCU_DETAIL" > "$OUT/ncu_detail.txt" 2>&1
    grep -E "Throughput|Issue Slots|Executed Ipc|Registers Per|Achieved Occupancy|Shared Memory Config|L1/TEX Hit|L2 Hit|Duration" \
        "$OUT/ncu_detail.txt" | head -30
  fi
else
  echo "ncu: not found or skipped"
fi
[ -n "${SKIP_DECODE:-}" ] || timeout "${DECODE_TIMEOUT:-300}" python3 bench/decode_bench.py --layers "${LAYERS:-2,6}" \
    --batches "${BATCHES:-1,128,512}" --skip "today,ours_fp8${BENCH_SKIP:+,$BENCH_SKIP}" \
    --out "$OUT" > "$OUT/decode_bench.log" 2>&1
echo "decode rc=$?"
grep -E '"name": "80 layers' "$OUT/decode_bench.log" | cut -c1-200
[ -n "${SKIP_GREEDY:-}" ] || timeout 150 python3 bench/nf4_mm_bench.py --no-products --greedy "${GREEDY:-64,32}" \
    --layers 4 --out "$OUT/greedy" > "$OUT/greedy.log" 2>&1
echo "greedy rc=$?"; grep -o '"identical": [0-9]*' "$OUT/greedy.log"
