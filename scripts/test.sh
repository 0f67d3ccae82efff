#!/usr/bin/env bash
# Set everything up (first run only) and run the whole test suite, slow tests included.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m "not slow"`. Two workers by default
# (pytest-xdist, one file per worker at a time so module fixtures are built once; the tests use
# the two cores about 1.2 on average alone). PISSA_TEST_WORKERS=0 runs them in this process.
# Not one OpenMP thread per worker: float32 results depend on the thread count, and the suite's
# measured tolerances were set on two (one thread tipped a QPiSSA code comparison, measured).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup.sh"
. "$root/scripts/env.sh"
cd "$root"
workers="${PISSA_TEST_WORKERS:-2}"
exec python -m pytest -n "$workers" --dist loadfile "$@"
