#!/usr/bin/env bash
# The GPU machine's one call: every measurement of the worker plane on a GPU, each figure into $OUT.
#
#   here, once:        bash ../shared/gpu/pack-carry.sh && bash flows/benchmarks/gpu_session.sh --pack
#   on the GPU machine (device tool `run`, carry [".gpu"], timeout_s 570):
#                      source .gpu/install.sh && bash flows/benchmarks/gpu_session.sh
#   on a CPU, to try it at small sizes (what CI and a GPU-less session can do):
#                      SEGPIPE_GPU_SESSION_SMALL=1 OUT=/tmp/gpu-out bash flows/benchmarks/gpu_session.sh
#
# In order, each step with its own time limit so that one slow step cannot eat the others' time
# (at most 7 minutes of steps, so that with the install the call stays under 8 minutes):
#   1. the machine: nvidia-smi, torch and CUDA versions                           -> machine.txt
#   2. the GPU-only tests (precision, streams, CUDA graphs, pinned memory)        -> tests.log
#   3. segpipe bench: smp Unet-resnet34, bf16, channels_last, 16384² RGB, tile 1024, overlap 0.25,
#      batch 8: model alone, segment stage, end to end, MONAI (GPU and CPU stitching) -> bench.json, bench.txt
#   4. the same model and segment stage with torch.compile, then with CUDA graphs   -> compile.json, graphs.json
#   5. the CPU actor scaling, --actors 1,2,4,8                                     -> actors.json, actors.txt
# A step that fails or runs out of time is named in summary.txt; the next step runs all the same.
set -uo pipefail
cd "$(dirname "$0")/../.."
out=${OUT:-/tmp/segpipe-gpu-session}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 RAY_USAGE_STATS_ENABLED=0
python=${PYTHON:-python3}

if [ "${1:-}" = "--pack" ]; then
    # What segpipe imports that the GPU machine's image does not hold (its package list:
    # the device tool's KINDS.md), added to pack-carry.sh's default set as wheels for Python 3.12.
    EXTRA="pydantic pydantic-core annotated-types typing-inspection monai nibabel shapely pyproj" \
        exec bash ../shared/gpu/pack-carry.sh
fi

if [ -n "${SEGPIPE_GPU_SESSION_SMALL:-}" ]; then  # a CPU try: the same steps at sizes a laptop finishes
    device=cpu side=1024 tile=256 batch=4 actors=1,2 seconds=1 limit=300 compile_limit=300 graphs_limit=200 actors_limit=200
else
    device=cuda side=16384 tile=1024 batch=8 actors=1,2,4,8 seconds=10 limit=130 compile_limit=90 graphs_limit=60 actors_limit=70
fi
work=$(mktemp -d)
summary="$out/summary.txt"
: > "$summary"

step() {  # step NAME SECONDS COMMAND...: run it under a time limit, its output to NAME.txt
    local name=$1 seconds=$2; shift 2
    local started=$SECONDS
    timeout --kill-after=10 "$seconds" "$@" > "$out/$name.txt" 2>&1
    local code=$?
    echo "$name: exit $code after $((SECONDS - started)) s" | tee -a "$summary"
    tail -n 30 "$out/$name.txt"
}

bench() {  # bench NAME SECONDS OPTIONS...: segpipe bench with the session's model and sizes; JSON to NAME.json
    local name=$1 seconds=$2; shift 2
    step "$name" "$seconds" "$python" -m flows.benchmarks.worker_plane --model unet-resnet34 --device "$device" \
        --side "$side" --tile "$tile" --overlap 0.25 --batch "$batch" --seconds "$seconds_model" \
        --workdir "$work" --json "$@"
    tail -n 1 "$out/$name.txt" > "$out/$name.json"
}
seconds_model=$seconds

step machine 15 bash -c "nvidia-smi || true; $python -c 'import torch; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"gpu\", torch.cuda.is_available() and torch.cuda.get_device_name(0))'; nproc; free -g"
step tests 60 "$python" -m pytest -q -p no:cacheprovider tests/test_runtime_options.py -k "cuda or gpu or graphs or pinned or streams"
bench bench "$limit" --parts model,segment,end-to-end,monai
bench compile "$compile_limit" --parts model,segment --compile
bench graphs "$graphs_limit" --parts model,segment --cuda-graphs
bench actors "$actors_limit" --parts none --actors "$actors"
rm -rf "$work"
echo "every figure is in $out" | tee -a "$summary"
