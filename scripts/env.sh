# Source me: activates .venv and, on Linux, preloads OpenBLAS (OpenMP build) for MLX when it is
# installed. See scripts/setup.sh for why the OpenMP build.
_pissa_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
. "${PISSA_VENV:-$_pissa_root/.venv}/bin/activate"  # PISSA_VENV: scripts/check_latest.sh's venv
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# Idle OpenMP threads (torch's, and OpenBLAS's for MLX) sleep instead of spinning. Measured here
# (scripts/bench_threads.py, docs/benchmarks.md): with two jobs on the 2 cores, spinning threads
# take torch training from 131 to 14 tokens/s each and a SmolLM2 init from 21 s to 179 s (a bounded
# GOMP_SPINCOUNT=10000: 66 tokens/s, 492 s); alone, sleeping costs training 15% (206 vs 243).
# LAPACK's SVD suffers most from sleeping threads, so the torch backend decomposes on one thread
# under this policy (pissa_torch.ops): the init takes 13 s alone and 14 s as two jobs at once.
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
if [ "$(uname -s)" = Linux ]; then
    _blas=/usr/lib/x86_64-linux-gnu/openblas-openmp/libblas.so.3
    if [ -e "$_blas" ]; then
        export LD_PRELOAD="$_blas${LD_PRELOAD:+:$LD_PRELOAD}"
    else
        echo "pissa: OpenBLAS not found ($_blas); MLX matmuls will be 20-30x slower" >&2
    fi
fi
unset _pissa_root _blas
