#!/usr/bin/env bash
# Start ONE real SGLang server for ROLE (large|small) of PRESET, in the foreground.
# Usable by hand on a GPU box:  launch/serve.sh large qwen3-32b-1.7b [HOST]
# HOST defaults to 127.0.0.1; give 0.0.0.0 to serve other machines: that needs
# RELAYGEN_SGLANG_API_KEY (the servers run --enable-custom-logit-processor, which executes code a
# client sends), else one line and exit 2. DRY_RUN=1 prints only.
# The command line comes from launch/presets.toml (the same code path as `relaygen up`).
# GPUs: the first block of ROLE as `relaygen up` allocates them (large first, then small,
# inside $CUDA_VISIBLE_DEVICES when set, else nvidia-smi's list); exported as CUDA_VISIBLE_DEVICES.
# One GPU for both roles (a share_device preset): start the large server first; `small` refuses
# while the large one's port is not listening, and is sized from what nvidia-smi reports free
# then (--mem-fraction-static and --max-total-tokens; servers/memory.py, docs/usage/gpus.md).
# With RELAYGEN_SGLANG_API_KEY set the server requires that key (SGLang's --api-key): it is
# passed in a 0600 YAML file under $RELAYGEN_HOME/run/auth (--config), never on the command line.
set -euo pipefail
if [ $# -lt 2 ] || [ $# -gt 3 ] || { [ "$1" != large ] && [ "$1" != small ]; }; then
  echo "usage: launch/serve.sh ROLE PRESET [HOST]   (ROLE: large|small)" >&2
  exit 2
fi
here=$(cd "$(dirname "$0")/.." && pwd)
py=${PYTHON:-}
if [ -z "$py" ]; then
  if [ -x "$here/.venv/bin/python" ]; then py="$here/.venv/bin/python"; else py=python3; fi
fi
# Prints "export K=V" lines and then the argv, one item per line, NUL-free.
plan=$("$py" -m relaygen_sgl.cli server-command "$@") || exit $?
mapfile -t lines <<<"$plan"
argv=()
for line in "${lines[@]}"; do
  case "$line" in
    "export "*) export "${line#export }" ;;
    *) argv+=("$line") ;;
  esac
done
echo "+ ${argv[*]}" >&2
if [ -n "${DRY_RUN:-}" ]; then  # print the environment and command only
  env | grep -E '^(PYTHONPATH|SGLANG_USE_CPU_ENGINE|CUDA_VISIBLE_DEVICES|CUDA_DEVICE_ORDER)=' >&2 || true
  exit 0
fi
exec "${argv[@]}"
