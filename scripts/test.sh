#!/usr/bin/env bash
# Set everything up (first run only) and run the whole test suite, slow tests included.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m "not slow"`. Two workers by default
# (pytest-xdist, one file per worker at a time so module fixtures are built once; the tests use
# the two cores about 1.2 on average alone), each worker on one OpenMP thread (unless
# OMP_NUM_THREADS is set): no oversubscription, and MLX's SVDs on Linux run 4x faster on one
# thread. PISSA_TEST_WORKERS=0 runs them in this process.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup.sh"
. "$root/scripts/env.sh"
cd "$root"
workers="${PISSA_TEST_WORKERS:-2}"
[ "$workers" = 0 ] || export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec python -m pytest -n "$workers" --dist loadfile "$@"
