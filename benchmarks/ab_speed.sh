#!/bin/bash
# One GPU, one call: the SmolLM2-135M recipe (compiled) and a Llama-3.1-8B shape cut to 4 layers
# (seq 4096), through `fastllm train`, for an earlier commit's tree and this one, alternating.
#
#   git archive <commit> | tar -x -C .bench/baseline      # the earlier tree, made beforehand
#   bash benchmarks/ab_speed.sh .bench/baseline DATA_DIR    # DATA_DIR: prepared tokens (fastllm prepare)
#
# Each run prints one JSON line: tokens/s and MFU per logged step (the first includes compilation).
# The earlier tree is run with the keys it had (micro_batch_size per rank and grad_accum, before
# train.batch_size fixed the global batch): BASE_SMOL / BASE_LLAMA override them.
set -u
BASE=$1 DATA=$2
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 FASTLLM_TYPECHECK=0 TOKENIZERS_PARALLELISM=false
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
COMMON="data.datasets=$DATA train.eval_every=0 data.validation_fraction=0 train.checkpoint_every=0 run.progress=off run.resume=false optim.warmup_steps=5"
SMOL="recipes/smollm2_135m.py train.steps=40 train.log_every=10 train.compile=true data.seq_len=2048"
LLAMA="recipes/llama3_8b.py model.n_layers=4 mesh.data=1 zero.stage=0 train.steps=40 train.log_every=10 data.seq_len=4096"
BASE_SMOL=${BASE_SMOL:-"train.micro_batch_size=64 train.grad_accum=1"}
BASE_LLAMA=${BASE_LLAMA:-"train.micro_batch_size=2 train.grad_accum=1"}
OUTDIR=${OUT:-/tmp/ab_speed}
mkdir -p "$OUTDIR"

run() {  # name, tree, args...
  local name=$1 tree=$2; shift 2
  local dir=/tmp/ab_speed_runs/$name
  (cd "$tree" && PYTHONPATH=$PWD:${PYTHONPATH:-} python3 -m fastllm train "$@" $COMMON run.dir=$dir > "$OUTDIR/$name.log" 2>&1)
  python3 - "$name" "$dir/metrics.jsonl" <<'PY'
import json, sys
name, path = sys.argv[1], sys.argv[2]
try:
    rows = [json.loads(line) for line in open(path) if line.strip()]
except OSError as error:
    sys.exit(print(json.dumps({"run": name, "error": str(error)})))
rows = [r for r in rows if "tokens_per_s" in r]
print(json.dumps({"run": name, "steps": [r["step"] for r in rows], "tokens_per_s": [round(r["tokens_per_s"]) for r in rows],
                  "mfu": [round(r.get("mfu", 0), 4) for r in rows]}))
PY
}

for round in 1 2; do
  run base-smollm2-$round "$BASE" $SMOL $BASE_SMOL
  run new-smollm2-$round . $SMOL train.batch_size=64 train.micro_batch_size=64
  run base-llama4-$round "$BASE" $LLAMA $BASE_LLAMA
  run new-llama4-$round . $LLAMA train.batch_size=2 train.micro_batch_size=2
done
