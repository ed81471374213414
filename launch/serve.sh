#!/usr/bin/env bash
# Start ONE real SGLang server for ROLE (large|small) of PRESET, in the foreground.
# Usable by hand on a GPU box:  launch/serve.sh large qwen3-32b-1.7b [HOST] [--no-api-key]
# The command line comes from launch/presets.toml (the same code path as `relaygen up`).
# GPUs: the first block of ROLE as `relaygen up` allocates them (large first, then small,
# inside $CUDA_VISIBLE_DEVICES when set, else nvidia-smi's list); exported as CUDA_VISIBLE_DEVICES.
# One GPU for both roles (a share_device preset): start the large server first; `small` refuses
# while the large one's port is not listening, and is sized from what nvidia-smi reports free
# then (--mem-fraction-static and --max-total-tokens; servers/memory.py, docs/usage/gpus.md).
# API key, as for `relaygen up`: the servers run --enable-custom-logit-processor, which executes code
# a client sends, so the server requires a key: $RELAYGEN_SGLANG_API_KEY, else the home's random
# one ($RELAYGEN_HOME/run/sglang-api-key.yaml, 0600: SGLang reads it with --config, never on the
# command line; clients on this machine read it there too). The servers of one home share it; it is
# removed when the last of them exits. --no-api-key: none (loopback only; a warning says why not).
# HOST defaults to 127.0.0.1; 0.0.0.0 (other machines) needs RELAYGEN_SGLANG_API_KEY, a key their
# clients can be given, else one line and exit 2. DRY_RUN=1 prints only and writes nothing.
# SGLang's IPC sockets go to a private TMPDIR, removed on exit.
set -euo pipefail
args=()
for a in "$@"; do [ "$a" = --no-api-key ] || args+=("$a"); done
if [ ${#args[@]} -lt 2 ] || [ ${#args[@]} -gt 3 ] || { [ "${args[0]}" != large ] && [ "${args[0]}" != small ]; }; then
  echo "usage: launch/serve.sh ROLE PRESET [HOST] [--no-api-key]   (ROLE: large|small)" >&2
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
key_file=
for i in "${!argv[@]}"; do
  if [ "${argv[$i]}" = --config ]; then key_file=${argv[$((i + 1))]}; fi
done
if [ -n "$key_file" ]; then
  # a shared lock on the key file, inherited by the server: the key is in use while it runs
  exec 9<"$key_file" || { echo "relaygen: the key file $key_file is gone; run again" >&2; exit 1; }
  flock -s 9
fi
TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-${TMPDIR:-/tmp}/torchinductor_$(id -un)}
export TORCHINDUCTOR_CACHE_DIR
tmp=$(mktemp -d "${TMPDIR:-/tmp}/relaygen-${args[0]}-XXXXXXXX")
cleanup() {
  rm -rf "$tmp"
  # the last server of this home to use the key takes its file along
  if [ -n "$key_file" ] && flock -n -x 9; then rm -f "$key_file"; fi
}
trap cleanup EXIT
TMPDIR=$tmp "${argv[@]}" &
server=$!
trap 'kill -TERM "$server" 2>/dev/null || true' INT TERM HUP
status=0
wait "$server" || status=$?
while kill -0 "$server" 2>/dev/null; do  # a signal ended the wait, not the server
  status=0
  wait "$server" || status=$?
done
exit "$status"
