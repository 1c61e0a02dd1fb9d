#!/usr/bin/env bash
# One device call (one H100 or H200) for issue 27 (two Sparks worth two), everything in the same call:
#   1. kd calibrate at the 1-node config's shapes (the synthetic Buddhist-QA data's micro-batches) -> calibrated.yaml;
#   2. bench/recipe_bench.py on the 1-node config at teacher depths 16 and 8 (no stock rows), the planner's step from
#      the calibrated profile printed against the measured one (target: within +-10% at both depths);
#   3. the same on the two-Spark LoRA config (configs/qwen2_5/72B_to_7B_kd_lora.yaml) as ONE process: its settings
#      (nf4_fp8 + compile, no AC, hybrid) at world size 1.
# Needs carry [".whl", ".bench_assets"] (docs/benchmarks.md's wheels; python bench/recipe_bench.py data --out
# .bench_assets). Long (~10 min): start it detached and follow it on the same warm machine:
#   device: setsid bash bench/spark_call.sh > /tmp/spark_call.log 2>&1 < /dev/null & sleep 540; tail -40 /tmp/spark_call.log
#   device (next call): tail -60 /tmp/spark_call.log; cp -r /tmp/spark_out/. $OUT/
#   CPU smoke test of the whole path: SMALL=1 bash bench/spark_call.sh
set -o pipefail
export PYTHONUNBUFFERED=1 WANDB_MODE=offline
DEST=${SPARK_OUT:-/tmp/spark_out}; mkdir -p "$DEST"
WORK=${SPARK_WORK:-/tmp/kdb}
if [ -z "${SMALL:-}" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  rm -rf /tmp/site/recipes  # torchtune's top-level `recipes` package would shadow ./recipes
  export PYTHONPATH=$PWD:/tmp/site PATH=/tmp/site/bin:$PATH
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv,noheader
  SIZE=(--depths 16,8 --steps 4); CAL=()
else
  SIZE=(--depths 2,1 --steps 3 --small); CAL=(device=cpu dtype=fp32 teacher_quantization=null optimizer.fused=False)
fi
mkdir -p "$WORK"
python3 - "$WORK/data.json" <<'PY'
import gzip, json, sys
recs = json.load(gzip.open(".bench_assets/buddhist_qa_synth.json.gz", "rt", encoding="utf-8"))[:600]
open(sys.argv[1], "w").write(json.dumps(recs, ensure_ascii=False))
PY
TOK=(tokenizer.path=.bench_assets/tokenizer/vocab.json tokenizer.merges_file=.bench_assets/tokenizer/merges.txt
     dataset.source=$WORK/data.json)
echo "== 1. kd calibrate ($(date -u +%H:%M:%S))"
if [ -z "${SMALL:-}" ]; then
  timeout 300 python3 -m kd.ops.cli calibrate --config configs/qwen2_5/72B_to_7B_kd_lora_1node.yaml "${TOK[@]}" \
    --out "$DEST/calibrated.yaml" --overwrite 2>&1 | grep -v "Skipping import" | tee "$DEST/calibrate.log"
else
  timeout 300 python3 -m kd.ops.cli calibrate --config configs/tiny/kd_lora.yaml "${CAL[@]}" \
    --out "$DEST/calibrated.yaml" --overwrite 2>&1 | grep -v "Skipping import" | tee "$DEST/calibrate.log"
fi
HW=$DEST/calibrated.yaml; [ -f "$HW" ] || HW=h200
echo "== 2. recipe bench, 1-node config, planner from $HW ($(date -u +%H:%M:%S))"
mkdir -p "$DEST/one_node" "$DEST/two_spark"
OUT=$DEST/one_node timeout 900 python3 bench/recipe_bench.py run --work "$WORK" --assets .bench_assets --stock-depths '' \
  "${SIZE[@]}" --hardware "$HW" 2>&1 | grep -v "Skipping import" > "$DEST/one_node/bench.log"
tail -14 "$DEST/one_node/bench.log"
echo "== 3. recipe bench, two-Spark config as one process ($(date -u +%H:%M:%S))"
OUT=$DEST/two_spark timeout 900 python3 bench/recipe_bench.py run --work "$WORK" --assets .bench_assets --stock-depths '' \
  "${SIZE[@]}" --hardware "$HW" --config configs/qwen2_5/72B_to_7B_kd_lora.yaml 2>&1 | grep -v "Skipping import" \
  > "$DEST/two_spark/bench.log"
tail -14 "$DEST/two_spark/bench.log"
echo "== done ($(date -u +%H:%M:%S))"
