"""--compile: each decoder layer through torch.compile gives the eager run's losses and adapter, packed
and not, with attention within records left eager (a graph break, not a recompile per batch).

torch.compile's tracing (dynamo, the graph breaks, the backward graphs) runs as it does on a GPU; the
code generator is aot_eager, which runs the traced graphs as they are, rather than inductor's C++
kernels (measured: 74 s to build them for a 2-layer model on this CPU, for the same losses to 6
decimals; docs/benchmarks.md)."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from pissa.cli import main  # noqa: E402
from pissa.files.formats.safetensors import load  # noqa: E402
from tests.conftest import DATA  # noqa: E402


@pytest.mark.slow
@pytest.mark.parametrize("extra", [[], ["--no-packing"]], ids=["packed", "unpacked"])
def test_compiled_layers_train_as_eager_ones(extra, tiny_chat, tmp_path, monkeypatch):
    import torch._dynamo

    import pissa_torch.train as train

    monkeypatch.setattr(train, "COMPILER", "aot_eager")
    compiled = []
    real = train.compile_layers
    monkeypatch.setattr(train, "compile_layers", lambda model: compiled.append(real(model)) or compiled[-1])
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    runs = {}
    for name, flags in (("eager", []), ("compiled", ["--compile"])):
        runs[name] = tmp_path / name
        assert main(["train", str(tiny_chat), "--data", str(DATA / "train.jsonl"), "--out", str(runs[name]),
                     "--steps", "3", "--batch-size", "4", "--max-seq-len", "128", "--lr", "3e-3", "--backend", "torch",
                     "--no-progress", *flags, *extra]) == 0
    assert compiled and compiled[0] >= 2
    # Dynamo traced each layer in two pieces around the attention (the graph breaks) and, once shapes
    # changed, again with them dynamic: measured 14 graphs for the 2 layers over both runs' 3 steps,
    # where a recompile at every batch's new shapes would add graphs with each step.
    assert 0 < counters["stats"]["unique_graphs"] <= 16, dict(counters["stats"])
    losses = [[json.loads(line)["loss"] for line in (runs[n] / "metrics.jsonl").read_text().splitlines()]
              for n in ("eager", "compiled")]
    np.testing.assert_allclose(losses[1], losses[0], rtol=1e-5)
    a, b = (load(runs[n] / "adapter" / "adapter_model.safetensors") for n in ("eager", "compiled"))
    scale = max(float(np.abs(x).max()) for x in a.values())
    assert max(float(np.abs(a[k].astype(np.float64) - b[k]).max()) for k in a) <= 1e-5 * scale
