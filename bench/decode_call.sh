#!/usr/bin/env bash
# One device call (one H200 or H100) for issue 12's decode figures, everything compared in the same call:
#   1. bench/overlap_probe.py: one 72B layer at batch 512, dequantisation of the next layer on a side stream under
#      SM carve-outs (cuBLASLt / cuBLAS SM target) and stream priorities vs serial (DequantAhead's mechanism);
#   2. bench/decode_bench.py: static decode (NF4 auto, nf4_fp8), each also with dequant_ahead at the probe's best
#      carve-out, 24 (the generate config's default), and EXTRA_AHEAD (default 16: the H100's best), at BATCHES (default 1,128,512), the per-kernel pieces, the transformers + bitsandbytes
#      anchor, the breakdown;
#   3. the GPU tests of the modules these change (linear groups / DequantAhead, the CUDA NF4 kernels).
# Needs carry [".whl", ".whlb"] (docs/benchmarks.md's wheels + bitsandbytes==0.50.2, manylinux x86_64; ~54 MiB).
# Here, once: pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 (and
# the other manylinux tags) -d .whl torchtune==0.6.1 torchao==0.15.0 omegaconf==2.4.0 torchdata==0.11.0 datasets dill
# multiprocess blobfile kagglehub kagglesdk pycryptodomex; antlr4-python3-runtime 4.9.3 has no wheel on the index:
# pip wheel --no-deps -w .whl antlr4-python3-runtime==4.9.3; bitsandbytes==0.50.2 the same way into .whlb.
#   device tool: bash bench/decode_call.sh        (~8 min; writes $OUT/{overlap_probe,decode_bench}.{json,log})
#   shorter: PROBE_CARVEOUTS=0,16,32 BENCH_SKIP=today,kernels EXTRA_AHEAD= bash bench/decode_call.sh
#   issue 12's figures only (~3 min): SKIP_PROBE=1 BATCHES=1,512 BENCH_SKIP=today,kernels,ours_fp8,breakdown \
#       EXTRA_AHEAD= TEST_TIMEOUT=1 bash bench/decode_call.sh   (session 10 H200 call 4 also ran 16)
set -o pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl .whlb/*.whl || exit 1
rm -rf /tmp/site/recipes  # torchtune's top-level `recipes` package would shadow ./recipes
export PYTHONPATH=$PWD:/tmp/site
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.draw,power.limit,temperature.gpu --format=csv
[ -n "${SKIP_PROBE:-}" ] || timeout 150 python3 bench/overlap_probe.py --carveouts "${PROBE_CARVEOUTS:-0,8,16,24,32}" --out "$OUT" 2>&1 | grep -v -i warn > "$OUT/overlap_probe.log"
grep -sE '"name"' "$OUT/overlap_probe.log" | cut -c1-200
AHEAD=$(python3 - "$OUT/overlap_probe.json" ${EXTRA_AHEAD-16} <<'PY'
import json, re, sys
try:  # the probe's best pipelined row: "ahead c=24 prio" (cuBLASLt) or "ahead c=24 prio cublas" (cuBLAS SM target)
    rows = {r["name"]: r for r in json.load(open(sys.argv[1]))["rows"]}
    name = rows["summary"]["best_ahead"]
    best = re.search(r"c=(\d+)", name).group(1) + ("cb" if name.endswith(" cublas") else "")
except Exception:
    best = "24"
print(",".join(sorted({best, "24"} | set(sys.argv[2:]), key=lambda a: (int(a.rstrip("cb")), a))))
PY
)
echo "decode bench with dequant_ahead carve-outs: $AHEAD"
timeout 400 python3 bench/decode_bench.py --layers 2,6 --batches "${BATCHES:-1,128,512}" --skip "${BENCH_SKIP:-today}" \
    --ahead "$AHEAD" --out "$OUT" \
    > "$OUT/decode_bench.log" 2>&1
echo "bench rc=$?"
sed -n '/^## decode/,$p' "$OUT/decode_bench.log" | grep -v "^per-layer"
nvidia-smi --query-gpu=clocks.sm,power.draw,temperature.gpu --format=csv,noheader
timeout "${TEST_TIMEOUT:-100}" python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_linear_groups.py tests/test_nf4_cuda.py \
    -k "ahead or bit_exact or dequant or carveout" 2>&1 | tail -8
