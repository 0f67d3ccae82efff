#!/usr/bin/env bash
# The main job: set everything up (first run only), then PiSSA-initialise the embedded
# SmolLM2-135M-Instruct with every available backend. Output goes to out/<backend>/.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup.sh"
. "$root/scripts/env.sh"
cd "$root"
for backend in $(python -c "from pissa.ops import available_backends; print(*available_backends())"); do
    echo "== pissa init smollm2-135m --backend $backend"
    pissa init smollm2-135m --out "out/smollm2-$backend" --backend "$backend" --force
done
