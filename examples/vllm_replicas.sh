#!/usr/bin/env bash
# One kbsync daemon edits; two vLLM replicas with the kbsync plugin serve its HEAD. On loopback, one CPU each.
#   make install install-vllm && bash examples/vllm_replicas.sh
# Leaves everything under $WORK (default: a new temporary folder); Ctrl-C stops all three servers.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=${WORK:-$(mktemp -d -t kbsync-replicas-XXXX)}
STATE=$WORK/state
KBSYNC="$ROOT/.venv/bin/kbsync --state-dir $STATE"
VPY=$ROOT/.venv-vllm/bin/python
mkdir -p "$STATE"
trap 'kill $(jobs -p) 2>/dev/null; wait' EXIT

echo "== facts and one edit step (the first run converts the model and builds its key statistics)"
$KBSYNC facts import "$ROOT/examples/facts.jsonl"
$KBSYNC sync
MODEL=$("$ROOT/.venv/bin/python" -c "from editor.loading import model_directory; print(model_directory('embedded', '$STATE'))")

echo "== the kbsync daemon on :8765 (the editor; its own answers are the reference)"
$KBSYNC run --port 8765 --interval 3600 > "$WORK/daemon.log" 2>&1 &

for i in 0 1; do
  port=$((8001 + i)); mkdir -p "$WORK/replica-$i"
  echo "== vLLM replica $i on :$port (log: $WORK/replica-$i.log)"
  (cd "$WORK/replica-$i" && KBSYNC_STATE_DIR=$STATE VLLM_CPU_KVCACHE_SPACE=1 VLLM_CPU_OMP_THREADS_BIND=$i \
     "$VPY" -m vllm.entrypoints.openai.api_server --model "$MODEL" --served-model-name smollm2 --dtype float32 \
     --max-model-len 512 --enforce-eager --host 127.0.0.1 --port $port > "$WORK/replica-$i.log" 2>&1) &
done
for port in 8765 8001 8002; do
  until curl -sf "http://127.0.0.1:$port/v1/models" > /dev/null; do sleep 2; done
done

ask() {   # ask PORT: the answer and the version that produced it
  curl -s "http://127.0.0.1:$1/v1/completions" -H 'Content-Type: application/json' \
    -d '{"model": "smollm2", "prompt": "The mother tongue of Danielle Darrieux is", "max_tokens": 4, "temperature": 0}' |
    "$VPY" -c 'import json, sys; d = json.load(sys.stdin); print(repr(d["choices"][0]["text"]), d["system_fingerprint"])'
}
echo "== at HEAD";       for p in 8001 8002; do echo ":$p $(ask $p)"; done
$KBSYNC rollback base --reason "replica demo"
t0=$(date +%s.%N)        # the replicas read HEAD between steps, every 0.25 s at most
until [[ "$(ask 8001)" == *kbsync-base* && "$(ask 8002)" == *kbsync-base* ]]; do :; done
echo "both replicas at base $(echo "$(date +%s.%N) - $t0" | bc) s after the rollback returned"
echo "== after rollback to base"; for p in 8001 8002; do echo ":$p $(ask $p)"; done
