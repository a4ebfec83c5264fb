#!/usr/bin/env bash
# The training benchmarks on a CUDA device machine (one GPU, no network), as one short script.
#
# What it needs beside the working tree (both ignored by git, carried by the device tool):
#   .whl/      wheels of what the machine's image lacks or has in another version: transformers,
#              peft, trl, datasets (+ dill, multiprocess), bitsandbytes, gguf (pip download
#              --no-deps --platform manylinux..., see the device README)
#   .devbase/  config.json and tokenizer files of the embedded base (`adapterkit base show
#              smollm2-135m --json` gives its folder); the weights are random (random_base.py):
#              time and memory depend on the shapes only, so every arm runs with --no-eval.
#
#   OUT=/tmp/out [STEPS=40] [RUN="sft qlora ..."] bash benchmarks/device_check.sh
#
# Each step has its own time limit and writes its JSON to $OUT as it ends, so a step that fails
# or runs out of time leaves the others' figures.
set -u
OUT=${OUT:-/tmp/device-check}
STEPS=${STEPS:-40}
BIG_STEPS=${BIG_STEPS:-20}
SMALL=${SMALL:-135m}
BIG=${BIG:-1.7b}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/log.txt") 2>&1
start=$(date +%s)

if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile \
        --no-cache-dir --target /tmp/site . || exit 1
    export PYTHONPATH=/tmp/site
fi
DEADLINE=${DEADLINE:-570}
RUN=${RUN:-sft guard dpo serve big-base qlora memory}  # the steps to run; also: dpo-profiled
#   serve-fp32 serve-bf16 serve-profile (see below)
export ADAPTERKIT_HOME=${ADAPTERKIT_HOME:-/tmp/akh} PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1  # no network there
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no GPU"
python3 -m pip list 2>/dev/null | grep -iE "^(pyarrow|fsspec|pandas|accelerate|huggingface.hub|tokenizers) "
python3 -c "import torch, transformers, peft, trl, bitsandbytes, datasets
print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available(),
      '| transformers', transformers.__version__, '| peft', peft.__version__,
      '| trl', trl.__version__, '| bitsandbytes', bitsandbytes.__version__)"

step() {  # step NAME LIMIT_SECONDS COMMAND...: at most LIMIT s, and never past $DEADLINE
    local name=$1 limit=$2 left
    shift 2
    case " $RUN " in *" $name "*) ;; *) echo "== $name not asked for (RUN=$RUN)"; return;; esac
    left=$(( DEADLINE - ($(date +%s) - start) ))
    [ "$left" -lt "$limit" ] && limit=$left
    if [ "$limit" -le 10 ]; then echo "== $name skipped: past the deadline"; return; fi
    echo "== $name (limit $limit s, $(( $(date +%s) - start )) s in): $*"
    "$@" &
    local pid=$!
    # on time-out, the benchmark's own children (one process per arm) go too
    ( sleep "$limit"; echo "== $name: out of time"; pkill -TERM -P "$pid"; kill "$pid" ) &
    local watcher=$!
    wait "$pid"
    echo "== $name rc=$? ($(( $(date +%s) - start )) s in)"
    kill "$watcher" 2>/dev/null
}

# the first process on a fresh machine reads torch's CUDA libraries from disk: once, here, so
# that no arm pays it
python3 -c "import torch, transformers, peft, trl; torch.ones(1, device='cuda').sum().item()"
python3 benchmarks/random_base.py .devbase /tmp/bases/small --shape "$SMALL" || exit 1
W="python3 benchmarks/bench_train_wall.py --no-eval --base /tmp/bases/small --ref plain-bf16"
# 1. sft, whole command vs the plain TRL + PEFT script: same settings (bf16 autocast) and TRL's
#    defaults (gradient checkpointing on)
step sft ${SFT_LIMIT:-150} $W --steps "$STEPS" --json "$OUT/sft.json" \
    --arms "${SFT_ARMS:-plain-bf16,plain-trl-gc,ours-auto}"
# 2. the forgetting guard on vs off (the base's side computed in the run: nothing cached)
step guard ${GUARD_LIMIT:-100} $W --steps "$STEPS" --json "$OUT/guard.json" \
    --arms ours-general,ours-guard --ref ours-general
# 3. dpo, the reference computed alongside each step in both
step dpo ${DPO_LIMIT:-80} $W --trainer dpo --steps "$BIG_STEPS" --json "$OUT/dpo.json" \
    --arms "${DPO_ARMS:-plain-bf16,ours-auto}"
# 3b. dpo again, the arms in the other order, each step timed and two profiled (torch.profiler:
#    ops, synchronisations) by benchmarks/step_profile: the step times and profiles go to
#    $OUT/steps.txt
profiled() {
    local dir=/tmp/step-profiles
    PYTHONPATH="$PWD/benchmarks/step_profile${PYTHONPATH:+:$PYTHONPATH}" STEP_PROFILE_OUT=$dir \
        STEP_PROFILE_STEPS=${STEP_PROFILE_STEPS:-10,11} "$@"
    local rc=$?
    cat "$dir"/*.txt >> "$OUT/steps.txt" 2>/dev/null
    rm -rf "$dir"
    return $rc
}
step dpo-profiled ${DPO_LIMIT:-80} profiled $W --trainer dpo --steps "$BIG_STEPS" \
    --json "$OUT/dpo-profiled.json" --arms ours-auto,plain-bf16
# 4a. the engine's greedy answers against PEFT's mixed-adapter generate, float32 and then
#     bfloat16 (the default on a GPU): where they agree token for token, and where not
SERVE="python3 benchmarks/bench_serve.py --base /tmp/bases/small --books 8 --requests 32
    --new-tokens 64 --attached 0 --rounds ${SERVE_ROUNDS:-1} --ignore-eos"
step serve-fp32 ${SERVE_LIMIT:-120} $SERVE --dtype float32 --paths "${SERVE_FP32_PATHS:-mixed,one_book,peft}"
step serve-bf16 ${SERVE_LIMIT:-120} $SERVE --paths "${SERVE_BF16_PATHS:-mixed,one_book,peft}"
# 4b. where an engine decode step's time goes, float32 then bfloat16 (in the fourth H200 session
#     bfloat16 gave 2.2-2.5x fewer tokens/s than float32, cause not found): torch.profiler's
#     operator tables (CUDA time first) of a few steps of each engine path, to $OUT/serve-profile.txt
serve_profile() {
    local dtype
    for dtype in float32 bfloat16; do
        # (the later --new-tokens and --rounds win: argparse)
        $SERVE --new-tokens 16 --rounds 1 --paths mixed,one_book --dtype "$dtype" \
            --profile "$OUT/serve-profile.txt" || return
    done
}
step serve-profile ${SERVE_LIMIT:-120} serve_profile
# 4c. serving: the engine's mixed-adapter batches against one book, a swap per request and
#    PEFT's mixed-adapter generate (issue #12), every request decoding the same tokens
step serve ${SERVE_LIMIT:-120} $SERVE
# 5. QLoRA on the bigger shape: 4-bit against bf16, ours against the plain script; then the
#    loaded base's memory alone, 4-bit against bf16
step big-base ${BASE_LIMIT:-60} python3 benchmarks/random_base.py .devbase /tmp/bases/big \
    --shape "$BIG" --dtype bfloat16
step qlora ${QLORA_LIMIT:-160} python3 benchmarks/bench_train_wall.py --no-eval \
    --base /tmp/bases/big --ref "${QLORA_REF:-plain-bf16}" --steps "$BIG_STEPS" --json "$OUT/qlora.json" \
    --arms "${QLORA_ARMS:-plain-bf16,plain-qlora,ours-auto,ours-qlora}"
step memory ${MEMORY_LIMIT:-60} python3 benchmarks/bench_qlora_memory.py --base /tmp/bases/big \
    --json "$OUT/memory.json"
echo "done in $(( $(date +%s) - start )) s"
