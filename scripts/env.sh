# Source me: activates .venv and, on Linux, preloads OpenBLAS (OpenMP build) for MLX when it is
# installed. See scripts/setup.sh for why the OpenMP build.
_pissa_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
. "$_pissa_root/.venv/bin/activate"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# Idle OpenMP threads (torch's, and OpenBLAS's for MLX) sleep instead of spinning. Alone it changes
# nothing measurable (torch 163/174 vs 168/186 tokens/s; MLX within noise); with two jobs on the
# same cores, spinning threads made one QPiSSA init take 1046 s instead of 51-104 s.
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
