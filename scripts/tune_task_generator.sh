#!/usr/bin/env bash
# Tune the task-objective generator of experiment=dnd_minilm_task on training tasks only.
#
# One fold (ARC-Challenge held out, trained on the other five datasets), one generator per setting; the criterion
# is the accuracy of adapters generated from the prompts of two *training* tasks, ARC-Easy and OpenBookQA, on their
# validation splits (the leave-one-out table scores their test splits, so no table document is looked at).
# Usage: scripts/tune_task_generator.sh <run dir of experiment=dnd_minilm_task> <out dir> name:override,... ...
#   e.g. scripts/tune_task_generator.sh runs/dnd_minilm_task runs/tune lr1e-4_bound:train.lr=1e-4,generator.border_bound=[0.08,0.5]
set -euo pipefail
run=$(realpath "$1"); out=$(realpath -m "$2"); shift 2
held=arc_challenge
train="['arc_easy','boolq','piqa','winogrande','openbookqa','arc_challenge']"
common=(model=minilm dataset=commonsense6 "generator.datasets=$train" generator.heldout=$held
        "++generator.tokens={$held:'$run/tokenize/$held'}" generator.objective=task generator.residual=true
        train.max_steps=100 train.per_device_batch=1 train.eval_every=50 generator.eval_adapters=1
        generator.task.batch_size=16 train.warmup_steps=10)
for spec in "$@"; do
  name=${spec%%:*}; IFS=',' read -r -a extra <<< "${spec#*:}"
  # a list value ([a,b]) was split on its comma: rejoin the pieces of one override
  joined=(); for x in "${extra[@]}"; do
    if [[ ${#joined[@]} -gt 0 && ${joined[-1]} == *"["* && ${joined[-1]} != *"]"* ]]; then joined[-1]+=",$x"; else joined+=("$x"); fi
  done
  gen="$out/$name/generator"
  loragen stage=generator "${common[@]}" "${joined[@]}" hydra.run.dir="$gen"
  bound=$(python -c "import json;print(json.dumps(json.load(open('$gen/generator/generator.json'))['generator']['border_bound']).replace(' ',''))")
  labels=""
  for d in arc_easy openbookqa; do
    loragen stage=generate model=minilm dataset=commonsense6 generate.checkpoint="$gen" generate.num_adapters=2 \
      generate.prompts=$d:validation generator.residual=true "generator.border_bound=$bound" \
      hydra.run.dir="$out/$name/generate-$d"
    loragen stage=evaluate model=minilm dataset=$d eval.split=validation \
      "eval.adapters={gen-000:'$out/$name/generate-$d/adapters/gen-000',gen-001:'$out/$name/generate-$d/adapters/gen-001'}" \
      hydra.run.dir="$out/$name/evaluate-$d"
  done
done
python - "$out" "$@" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
print(f"{'setting':28s} {'dataset':12s} {'base':>6s} {'gen-000':>8s} {'gen-001':>8s}  final train-task loss")
for spec in sys.argv[2:]:
    name = spec.split(":")[0]
    loss = json.loads((out / name / "generator" / "metrics.json").read_text())["final"]
    for d in ("arc_easy", "openbookqa"):
        r = json.loads((out / name / f"evaluate-{d}" / "results.json").read_text())
        acc = {e["label"]: e["acc"] for e in r["results"]}
        print(f"{name:28s} {d:12s} " + " ".join(f"{acc.get(k, float('nan')):8.3f}" for k in ("base", "gen-000", "gen-001"))
              + f"  {loss}")
PY
