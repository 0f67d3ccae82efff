# Source me: activates .venv and, on Linux, preloads OpenBLAS (OpenMP build) for MLX when it is
# installed. See scripts/setup.sh for why the OpenMP build.
_pissa_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
. "$_pissa_root/.venv/bin/activate"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if [ "$(uname -s)" = Linux ]; then
    _blas=/usr/lib/x86_64-linux-gnu/openblas-openmp/libblas.so.3
    if [ -e "$_blas" ]; then
        export LD_PRELOAD="$_blas${LD_PRELOAD:+:$LD_PRELOAD}"
    else
        echo "pissa: OpenBLAS not found ($_blas); MLX matmuls will be 20-30x slower" >&2
    fi
fi
unset _pissa_root _blas
