#!/usr/bin/env bash
# The main job, on the embedded SmolLM2-135M-Instruct (about 11-16 minutes on 2 CPU cores):
#   1. pissa init with every available backend (out/smollm2-<backend>/);
#   2. on the torch and the MLX backend: eval before training, a short training run on the
#      arithmetic demo task (data/arith), eval after, conversion to a plain LoRA (plus mlx-lm's
#      format for MLX), and one generated answer.
# DEMO_STEPS sets the training steps (default 40).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup.sh"
. "$root/scripts/env.sh"
cd "$root"
steps="${DEMO_STEPS:-40}"
question="Mia has 23 marbles. She buys 4 bags of 6 marbles. She gives 9 marbles to Leo. How many marbles does Mia have now?"

for backend in $(python -c "from pissa.numeric.ops import available_backends; print(*available_backends())"); do
    echo "== pissa init smollm2-135m --backend $backend"
    pissa init smollm2-135m --out "out/smollm2-$backend" --backend "$backend" --force --no-progress
done

for backend in $(python -c "from pissa.numeric.ops import available_backends; print(*available_backends()[1:])"); do
    model="out/smollm2-$backend"
    run="out/run-$backend"
    n=32; s="$steps"; format=peft
    [ "$backend" = mlx ] && format=mlx-lm
    echo "== eval before training ($backend): exact match on $n held-out problems"
    pissa eval "$model" --data data/arith/eval.jsonl --limit "$n" --backend "$backend" --no-progress
    echo "== pissa train ($backend, $s steps)"
    pissa train "$model" --data data/arith/train.jsonl --eval-data data/arith/eval.jsonl --out "$run" \
        --steps "$s" --lr 2e-4 --max-seq-len 128 --backend "$backend" --force
    echo "== eval after training ($backend)"
    pissa eval "$model" --adapter "$run/adapter" --data data/arith/eval.jsonl --limit "$n" --backend "$backend" --no-progress
    echo "== pissa convert: the trained PiSSA adapter as a rank-32 LoRA on the original model ($format)"
    pissa convert --initial "$model/pissa_init" --trained "$run/adapter" --out "out/lora-$backend" \
        --format "$format" --force
    echo "== one answer from the trained model"
    echo "Q: $question"
    echo "A: $(pissa generate "$model" --adapter "$run/adapter" --prompt "$question" --backend "$backend")"
done
echo "== done: models in out/, runs (metrics.jsonl, loss.png, adapter, lora) in out/run-*"
