#!/usr/bin/env bash
# The smallest device call for issue 12's large-batch question (~3 min on one H100/H200): NF4 static decode at
# batches 128 and 512 without DequantAhead, with dequant_ahead=24 (cuBLASLt carve-out, the generate config's
# default, the H200's best) and 16 (the H100's best), extrapolated from 2 and 6 layers, then the DequantAhead and
# carve-out GPU tests. Needs carry [".whl"] (docs/benchmarks.md's wheels; no bitsandbytes: the anchor is not run here).
#   device tool: bash bench/decode_call_min.sh
set -o pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
rm -rf /tmp/site/recipes
export PYTHONPATH=$PWD:/tmp/site
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,clocks.sm,power.draw,temperature.gpu --format=csv,noheader
timeout 300 python3 bench/decode_bench.py --layers 2,6 --batches 128,512 --skip today,kernels,hf,ours_fp8,breakdown \
    --ahead 16,24 --out "$OUT" > "$OUT/decode_bench.log" 2>&1
echo "bench rc=$?"
grep -E '"name": "(gen|80)' "$OUT/decode_bench.log" | cut -c1-160
sed -n '/^## decode/,$p' "$OUT/decode_bench.log"
timeout 60 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_linear_groups.py -k "(ahead and nf4 and not fp8) or carveout" \
    2>&1 | tail -4
