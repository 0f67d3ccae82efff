"""The core imports no framework, and `pissa init --backend numpy` runs with torch and mlx absent."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from tests.conftest import write_tiny_llama

# Makes torch and mlx look uninstalled: `import torch` raises ModuleNotFoundError and
# importlib.util.find_spec("torch") returns None, as transformers' availability checks expect.
BLOCK = textwrap.dedent("""
    import sys
    for name in ("torch", "mlx", "mlx_lm"):
        sys.modules[name] = None
""")


def test_importing_the_core_imports_no_framework():
    code = textwrap.dedent("""
        import sys
        import pissa, pissa.cli, pissa.jobs.init, pissa.numeric.decompose, pissa.numeric.ops, pissa.adapters.spec
        import pissa.files.loaders.hf, pissa.files.loaders.gguf, pissa.files.formats.peft, pissa.files.formats.hf
        import pissa.adapters.kinds.lora, pissa.adapters.kinds.mora, pissa.training.loop, pissa.jobs.merge, pissa.jobs.convert, pissa.dist, pissa.jobs.init_ranks
        bad = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "mlx", "mlx_lm"))
        print(bad)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("model", ["tiny", "smollm2-135m"])
def test_numpy_init_runs_without_torch_or_mlx(model, tmp_path):
    src = str(write_tiny_llama(tmp_path / "tiny")) if model == "tiny" else model
    code = BLOCK + textwrap.dedent(f"""
        from pissa.cli import main
        rc = main(["init", {src!r}, "--out", {str(tmp_path / "out")!r}, "--rank", "2",
                   "--init", "pissa-fast", "--niter", "1", "--targets", "q_proj", "--no-progress"])
        bad = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "mlx") and sys.modules[m] is not None)
        print(rc, bad)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "0 []", out.stdout + out.stderr
    assert (tmp_path / "out" / "pissa_init" / "adapter_model.safetensors").exists()


def test_asking_for_a_missing_backend_says_how_to_install_it(tmp_path):
    code = BLOCK + textwrap.dedent(f"""
        from pissa.cli import main
        sys.exit(main(["init", {str(write_tiny_llama(tmp_path / "tiny"))!r}, "--out",
                       {str(tmp_path / "out")!r}, "--backend", "torch"]))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 2
    assert "pip install 'pissa[torch]'" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "out").exists()


def test_every_package_is_listed_for_installation():
    """pyproject.toml lists packages by name: a new subpackage missing there works in the editable
    checkout and is absent from a real install."""
    import tomllib
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    listed = set(tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(root).parts) for p in (root / "pissa").rglob("__init__.py")}
    assert found <= listed, sorted(found - listed)
