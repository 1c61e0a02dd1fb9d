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
tune run recipes/kd_lora.py --config configs/tiny/kd_lora.yaml "$@"
out=outputs/tiny_kd_lora
for a in "$@"; do case "$a" in output_dir=*) out="${a#output_dir=}" ;; esac; done
echo
kd summary "$out" --eval-data "$KD_TESTBED_DIR/demo_buddhist_qa.json"
