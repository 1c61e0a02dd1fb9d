#!/usr/bin/env bash
# One device call (2x H200): GPU checks of recipes/kd_lora.py on the tiny test bed (single GPU; two GPUs with
# NCCL/FSDP2; the two-node launcher on one host with NCCL P2P/SHM disabled, preflight bandwidth) and the
# data-parallel scaling of the full-shape KD step (bench/kd_step_dp.py).  Needs: carry [.whlg, .cache/gpu_testbed]
#   (.whlg = the .whl wheels minus bitsandbytes; .cache/gpu_testbed = python -m kd.testing.testbed --out ...)
set -u
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whlg/*.whl || exit 1
rm -rf /tmp/site/recipes            # torchtune's top-level `recipes` package would shadow ./recipes
export PYTHONPATH=$PWD:/tmp/site PATH=/tmp/site/bin:$PATH
export KD_TESTBED_DIR=$PWD/.cache/gpu_testbed
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch, torchtune, torchao; print('torch', torch.__version__, 'torchtune', torchtune.__version__, 'torchao', torchao.__version__, 'gpus', torch.cuda.device_count())"
C=(--config configs/tiny/kd_lora.yaml device=cuda dtype=bf16 teacher_quantization=nf4 max_steps_per_epoch=6
   progress_bar=False '~eval_every_n_steps' save_every_n_steps=100)
sum() { python3 - "$1" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1] + "/metrics.jsonl") if '"train"' in l]
for r in rows: print(f"  step {r['step']}: loss {r['loss']:.5f} ce {r['ce_loss']:.5f} kl {r['kl']:.5f} gn {r.get('grad_norm', 0):.5f} tok/s {r['tokens_per_second']:.0f} peak {r.get('peak_memory_alloc_gib', 0):.3f} GiB")
PY
}
echo "== 1. single GPU, bf16, NF4 teacher"
tune run recipes/kd_lora.py "${C[@]}" output_dir=/tmp/r1 > $OUT/r1.log 2>&1; echo "rc=$?"; sum /tmp/r1
echo "== 2. two GPUs, NCCL, FSDP2 (student and NF4 teacher sharded), global batch 4"
tune run --nproc_per_node 2 recipes/kd_lora.py "${C[@]}" batch_size=2 output_dir=/tmp/r2 > $OUT/r2.log 2>&1; echo "rc=$?"; sum /tmp/r2
echo "== 3. launcher: two 'nodes' on one host (one GPU each), NCCL_P2P_DISABLE=1 NCCL_SHM_DISABLE=1, static rdzv"
export NCCL_P2P_DISABLE=1 NCCL_SHM_DISABLE=1 MASTER_ADDR=127.0.0.1 MASTER_PORT=29611 KD_LOG_DIR=/tmp/launch KD_RDZV_BACKEND=static
L=(--config configs/tiny/kd_lora.yaml device=cuda dtype=bf16 teacher_quantization=nf4 max_steps_per_epoch=6 progress_bar=False
   '~eval_every_n_steps' save_every_n_steps=100 batch_size=2 fsdp_strategy=hybrid teacher_sharding=replicate output_dir=/tmp/r3)
CUDA_VISIBLE_DEVICES=0 NODE_RANK=0 bash launch/run_node.sh "${L[@]}" > $OUT/node0.log 2>&1 &
CUDA_VISIBLE_DEVICES=1 NODE_RANK=1 bash launch/run_node.sh "${L[@]}" > $OUT/node1.log 2>&1; echo "node1 rc=$?"
wait; echo "node0 rc=$?"
grep -hiE "bus|GB/s|preflight.*(ok|pass|fail)" $OUT/node0.log | head -8; sum /tmp/r3
unset NCCL_P2P_DISABLE NCCL_SHM_DISABLE
if [ -n "${SKIP_DP:-}" ]; then exit 0; fi
echo "== 4. full shapes (72B NF4 teacher + 7B LoRA r64), 4x2048 tokens per GPU: 1 GPU, 2 GPUs, 2 GPUs without P2P/SHM"
torchrun --nproc_per_node 1 bench/kd_step_dp.py --steps 4 2>&1 | grep -E "^\[dp\]|Error|error" | tail -3
torchrun --nproc_per_node 2 bench/kd_step_dp.py --steps 4 2>&1 | grep -E "^\[dp\]|Error|error" | tail -3
NCCL_P2P_DISABLE=1 NCCL_SHM_DISABLE=1 torchrun --nproc_per_node 2 bench/kd_step_dp.py --steps 4 2>&1 | grep -E "^\[dp\]|Error|error" | tail -3
