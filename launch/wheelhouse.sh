#!/usr/bin/env bash
# Offline install of kd's exact pinned stack on air-gapped nodes (e.g. two DGX Sparks without internet).
#
# On a CONNECTED machine (best: same arch + Python as the nodes, e.g. aarch64 / Python 3.12 for DGX OS):
#   bash launch/wheelhouse.sh build wheelhouse/            # wheels for pyproject's pins + torch + kd build deps
#   # cross-download from an x86 box instead (binary wheels only, pure-python sdists are built to wheels):
#   KD_WHEEL_PLATFORM=manylinux_2_28_aarch64 KD_WHEEL_PY=3.12 bash launch/wheelhouse.sh build wheelhouse/
# Copy the directory (and this repository) to every node, then ON EACH NODE:
#   bash launch/wheelhouse.sh install wheelhouse/          # pip install --no-index --find-links, into .venv
#   bash launch/wheelhouse.sh requirements                 # just print the pinned requirement list
#
# torch: GB10 (sm_121) needs a CUDA >= 12.8 build (aarch64 CUDA wheels live on the PyTorch index, not PyPI):
#   TORCH_SPEC="torch==2.11.0" TORCH_INDEX=https://download.pytorch.org/whl/cu130 (defaults below).
set -euo pipefail
case "${1:-}" in
  -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0 ;;
esac
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.11.0}
TORCH_INDEX=${TORCH_INDEX:-https://download.pytorch.org/whl/cu130}
BUILD_DEPS=(hatchling editables)

requirements() {
  # pyproject's [project.dependencies] (+ the test extra with KD_WHEEL_TEST=1), torch replaced by TORCH_SPEC
  "$PY" - "$TORCH_SPEC" "${KD_WHEEL_TEST:-0}" <<'PY'
import sys, tomllib
d = tomllib.load(open("pyproject.toml", "rb"))["project"]
deps = list(d["dependencies"])
if sys.argv[2] == "1":
    deps += d.get("optional-dependencies", {}).get("test", [])
for x in deps:
    name = x.split(";")[0].strip()
    if name.replace(" ", "").startswith("torch") and name[5:6] in "=<>!~ " :
        print(sys.argv[1])
    else:
        print(name)
PY
}

build() {
  local dir=${1:-wheelhouse}
  mkdir -p "$dir"
  requirements > "$dir/requirements.txt"
  printf '%s\n' "${BUILD_DEPS[@]}" > "$dir/build-requirements.txt"
  echo "[wheelhouse] requirements -> $dir/requirements.txt:"; sed 's/^/  /' "$dir/requirements.txt"
  if [ -n "${KD_WHEEL_PLATFORM:-}" ]; then
    local plat=(--platform "$KD_WHEEL_PLATFORM" --platform manylinux2014_"${KD_WHEEL_PLATFORM##*_}"
                --python-version "${KD_WHEEL_PY:-3.12}" --implementation cp --only-binary=:all:)
    "$PY" -m pip download -d "$dir" "${plat[@]}" --extra-index-url "$TORCH_INDEX" -r "$dir/requirements.txt" \
      || { echo "[wheelhouse] some packages have no binary wheel for $KD_WHEEL_PLATFORM; building pure-python ones"; \
           "$PY" -m pip download -d "$dir/sdist" --no-deps --no-binary :all: -r "$dir/requirements.txt" || true; \
           for s in "$dir"/sdist/*; do "$PY" -m pip wheel --no-deps -w "$dir" "$s" || true; done; \
           "$PY" -m pip download -d "$dir" "${plat[@]}" --extra-index-url "$TORCH_INDEX" --find-links "$dir" \
             -r "$dir/requirements.txt"; }
    "$PY" -m pip download -d "$dir" "${plat[@]}" "${BUILD_DEPS[@]}"
  else
    # native: wheels for everything, sdists (e.g. antlr4-python3-runtime) built into wheels
    "$PY" -m pip wheel -w "$dir" --extra-index-url "$TORCH_INDEX" -r "$dir/requirements.txt"
    "$PY" -m pip wheel -w "$dir" "${BUILD_DEPS[@]}"
  fi
  (cd "$dir" && sha256sum ./*.whl > SHA256SUMS)
  echo "[wheelhouse] $(ls "$dir"/*.whl | wc -l) wheels in $dir ($(du -sh "$dir" | cut -f1)); copy it to every node"
}

install() {
  local dir=${1:-wheelhouse}
  [ -f "$dir/requirements.txt" ] || { echo "[wheelhouse] $dir/requirements.txt not found: run 'build' first" >&2; exit 2; }
  if [ -f "$dir/SHA256SUMS" ]; then (cd "$dir" && sha256sum --quiet -c SHA256SUMS) || { echo "[wheelhouse] checksum mismatch in $dir" >&2; exit 2; }; fi
  [ -x .venv/bin/python ] || "$PY" -m venv .venv
  . .venv/bin/activate
  local pipi=(python -m pip install --no-index --find-links "$dir")
  "${pipi[@]}" -r "$dir/build-requirements.txt"
  "${pipi[@]}" -r "$dir/requirements.txt"
  # kd itself, editable (so that preflight hashes this checkout), without network or build isolation
  "${pipi[@]}" --no-build-isolation --no-deps -e .
  python - <<'PY'
import torch, torchtune, torchao
print(f"[wheelhouse] installed: torch {torch.__version__} (CUDA {torch.version.cuda}), torchtune {torchtune.__version__}, torchao {torchao.__version__}")
if torch.cuda.is_available():
    print(f"[wheelhouse] GPU {torch.cuda.get_device_name()} sm_{''.join(map(str, torch.cuda.get_device_capability()))}, torch archs {torch.cuda.get_arch_list()}")
PY
}

case "${1:-}" in
  requirements) requirements ;;
  build) build "${2:-wheelhouse}" ;;
  install) install "${2:-wheelhouse}" ;;
  *) echo "usage: $0 requirements | build [DIR] | install [DIR]" >&2; exit 2 ;;
esac
