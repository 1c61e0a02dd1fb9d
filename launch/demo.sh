#!/usr/bin/env bash
# The README's main command: set up, build the tiny test-bed models (cached), and run a demo online
# distillation on CPU: a trained tiny teacher -> a random tiny LoRA student, 2 epochs x 27 steps.
#   bash launch/demo.sh [key=value ...]     # overrides go to the recipe, e.g. kd_ratio=0.7
# Ends with three lines: validation KL before -> after, where the adapter is, and the next command.
set -euo pipefail
case "${1:-}" in
  -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0 ;;
esac
cd "$(dirname "$0")/.."
bash launch/setup.sh
. .venv/bin/activate
export KD_TESTBED_DIR=${KD_TESTBED_DIR:-$PWD/.cache/testbed}
python -m kd.testing.testbed --out "$KD_TESTBED_DIR"
# Re-runnable: a fresh run directory per demo run. The first run writes $KD_DEMO_OUTPUT_DIR (default
# outputs/tiny_kd_lora); when it already holds a run, the next free <dir>-2, <dir>-3, ... is used and named (the
# earlier runs are kept). output_dir=, resume_from_checkpoint=True or overwrite=True on the command line win.
out=${KD_DEMO_OUTPUT_DIR:-outputs/tiny_kd_lora}
own=1; dir_arg=(output_dir="$out")
for a in "$@"; do case "$a" in output_dir=*) out="${a#output_dir=}"; own=0; dir_arg=() ;;
  resume_from_checkpoint=[Tt]rue|overwrite=[Tt]rue) own=0 ;; esac; done
if [ "$own" = 1 ] && { [ -e "$out/checkpoints" ] || [ -e "$out/.kd-run.lock" ]; }; then
  base=$out; n=2
  while [ -e "$base-$n" ]; do n=$((n + 1)); done
  out="$base-$n"
  echo "[demo] $base holds an earlier demo run (kept); this run writes to $out"
  dir_arg=(output_dir="$out")
fi
tune run recipes/kd_lora.py --config configs/tiny/kd_lora.yaml "${dir_arg[@]}" "$@"
echo
kd summary "$out" --eval-data "$KD_TESTBED_DIR/demo_buddhist_qa.json"
