"""Quantised weights on disk, in the layouts the tools already read.

QPiSSA writes its quantised residual model in one of two layouts, chosen by the scheme:

- nf4: transformers' bitsandbytes 4-bit serialisation. For a quantised module M:
    M.weight                                 uint8 [out * in / 2, 1], two codes per byte,
                                             the first in the high nibble
    M.weight.absmax                          float32 [out * in / group]
    M.weight.quant_map                       float32 [16], the NF4 levels
    M.weight.quant_state.bitsandbytes__nf4   uint8, the JSON {"quant_type", "blocksize",
                                             "dtype" (the storage dtype), "shape"}
  and config.json gets a "quantization_config" with quant_method "bitsandbytes",
  load_in_4bit, nf4, no double quantisation, and every linear layer that is NOT quantised in
  llm_int8_skip_modules. transformers + bitsandbytes load it as Linear4bit layers.
- affine (affine4, int8): mlx-lm's quantised layout. For a quantised module M:
    M.weight   uint32 [out, in * bits / 32], codes packed from the low bits up
    M.scales   [out, in / group], in the storage dtype
    M.biases   [out, in / group], in the storage dtype
  and config.json gets "quantization" = {"group_size", "bits", "mode": "affine"} (and the same
  under "quantization_config"). mlx_lm.load quantises exactly the modules that have .scales.

Both configs also carry "pissa_quantization": {"scheme", "group_size", "bits", "modules"}.
A bfloat16 (or float16) residual is stored as the libraries store a bfloat16 model's weights
(checked against transformers + bitsandbytes and mlx_lm.convert on a bfloat16 folder): nf4 keeps
absmax and quant_map float32, the packed codes uint8 (bnb_4bit_quant_storage) and the compute
dtype float32 (transformers' default), with "dtype": "bfloat16" in the quant state; affine stores
scales and biases in bfloat16.

Reading (for already-quantised input models) covers these two layouts plus bitsandbytes' double
quantisation (nested absmax) and 8-bit (LLM.int8) weights; `unquantized_view` turns such a
folder's tensors back into float32 weights.
"""

from __future__ import annotations

import json
from typing import Callable, Mapping

import numpy as np

from pissa.errors import PissaError
from pissa.numeric.dtypes import np_dtype
from pissa.numeric.quant import NF4_LEVELS, QTensor, QuantScheme, round_to, scheme as make_scheme

BNB_STATE = "quant_state.bitsandbytes__nf4"
BNB_FP4_LEVELS = np.array([0.0, 0.005208333333333333, 0.6666666666666666, 1.0, 0.3333333333333333, 0.5,
                           0.16666666666666666, 0.25, 0.0, -0.005208333333333333, -0.6666666666666666, -1.0,
                           -0.3333333333333333, -0.5, -0.16666666666666666, -0.25], dtype=np.float32)


def layout(s: QuantScheme) -> str:
    """"bnb" or "mlx": the on-disk layout of a scheme."""
    return "bnb" if s.kind == "nf4" else "mlx"


def _bnb_state_json(s: QuantScheme, shape: tuple[int, int], dtype: str) -> bytes:
    return json.dumps({"quant_type": "nf4", "blocksize": s.group_size, "dtype": dtype,
                       "shape": list(shape)}).encode()


def plan(module: str, shape: tuple[int, int], s: QuantScheme,
         dtype: str = "float32") -> list[tuple[str, np.dtype, tuple[int, ...]]]:
    """(name, dtype, shape) of the tensors that store module's quantised weight, in write order,
    for a weight stored in `dtype` (see the module docstring)."""
    out, n = shape
    if layout(s) == "bnb":
        return [(f"{module}.weight", np.dtype(np.uint8), (out * n // 2, 1)),
                (f"{module}.weight.absmax", np.dtype(np.float32), (out * n // s.group_size,)),
                (f"{module}.weight.quant_map", np.dtype(np.float32), (16,)),
                (f"{module}.weight.{BNB_STATE}", np.dtype(np.uint8), (len(_bnb_state_json(s, shape, dtype)),))]
    return [(f"{module}.weight", np.dtype(np.uint32), (out, n * s.bits // 32)),
            (f"{module}.scales", np_dtype(dtype), (out, n // s.group_size)),
            (f"{module}.biases", np_dtype(dtype), (out, n // s.group_size))]


def pack(module: str, q: QTensor) -> list[tuple[str, np.ndarray]]:
    """The tensors of plan(module, q.shape, q.scheme, q.dtype), filled from q."""
    s = q.scheme
    if layout(s) == "bnb":
        flat = q.codes.reshape(-1)
        packed = ((flat[0::2] << 4) | flat[1::2]).astype(np.uint8).reshape(-1, 1)
        state = np.frombuffer(_bnb_state_json(s, q.shape, q.dtype), dtype=np.uint8)
        return [(f"{module}.weight", packed), (f"{module}.weight.absmax", q.scales.astype(np.float32)),
                (f"{module}.weight.quant_map", NF4_LEVELS.copy()), (f"{module}.weight.{BNB_STATE}", state.copy())]
    dt = np_dtype(q.dtype)  # exact: the values are already of that dtype
    return [(f"{module}.weight", pack_bits(q.codes, s.bits)), (f"{module}.scales", q.scales.astype(dt)),
            (f"{module}.biases", q.biases.astype(dt))]


def pack_bits(codes: np.ndarray, bits: int) -> np.ndarray:
    """uint8 codes [out, in] -> uint32 [out, in * bits / 32], element k of a word in bits k*b.."""
    per = 32 // bits
    c = codes.astype(np.uint32).reshape(codes.shape[0], -1, per)
    shifts = (np.arange(per, dtype=np.uint32) * bits)
    return np.bitwise_or.reduce(c << shifts, axis=-1).astype(np.uint32)


def unpack_bits(words: np.ndarray, bits: int) -> np.ndarray:
    """The inverse of pack_bits: uint32 [out, w] -> uint8 [out, w * 32 / bits]."""
    per = 32 // bits
    shifts = (np.arange(per, dtype=np.uint32) * bits)
    c = (words.astype(np.uint32)[..., None] >> shifts) & np.uint32((1 << bits) - 1)
    return c.reshape(words.shape[0], -1).astype(np.uint8)


def config_entries(s: QuantScheme, quantized: list[str], unquantized_linear: list[str]) -> dict:
    """The config.json keys that describe the quantised model."""
    ours = {"scheme": s.name, "group_size": s.group_size, "bits": s.bits, "modules": sorted(quantized)}
    if layout(s) == "bnb":
        return {"quantization_config": {
            "quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False,
            "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": False,
            "bnb_4bit_compute_dtype": "float32", "bnb_4bit_quant_storage": "uint8",
            "llm_int8_skip_modules": sorted(set(unquantized_linear) | {"lm_head"})},
            "pissa_quantization": ours}
    q = {"group_size": s.group_size, "bits": s.bits, "mode": "affine"}
    return {"quantization": q, "quantization_config": dict(q), "pissa_quantization": ours}


# --- reading quantised input models --------------------------------------------------------

def describe(config: Mapping) -> str | None:
    """A short name for a config's quantisation ("mlx affine 4-bit", "bitsandbytes nf4", ...),
    or None for an unquantised model."""
    if isinstance(config.get("quantization"), dict):
        q = config["quantization"]
        return f"mlx {q.get('mode', 'affine')} {q.get('bits')}-bit"
    qc = config.get("quantization_config")
    if isinstance(qc, dict) and qc:
        method = qc.get("quant_method", "unknown")
        if method == "bitsandbytes":
            if qc.get("load_in_8bit"):
                return "bitsandbytes int8"
            return f"bitsandbytes {qc.get('bnb_4bit_quant_type', 'fp4')}"
        return str(method)
    return None


def unquantized_view(config: Mapping, shapes: Mapping[str, tuple[int, ...]],
                     get: Callable[[str], np.ndarray], where: str, dtypes: Mapping[str, str] | None = None
                     ) -> tuple[dict[str, tuple[int, ...]], Callable[[str], np.ndarray]]:
    """For a quantised folder: the logical tensors (float weights [out, in]) and a getter that
    dequantises them to float32, as the library computes them for the stored dtype (dtypes: the
    raw tensors' storage dtypes, "bfloat16", ...; absent ones count as float32). Unquantised
    tensors pass through.

    Raises:
        PissaError: for a quantisation this module cannot dequantise, naming it.
    """
    kind = describe(config)
    if kind is None:
        return dict(shapes), get
    if kind.startswith("mlx affine"):
        q = config["quantization"]
        return _mlx_view(shapes, get, int(q.get("bits", 4)), int(q.get("group_size", 64)), dtypes or {})
    if kind.startswith("bitsandbytes") and kind.split()[-1] in ("nf4", "fp4", "int8"):
        return _bnb_view(shapes, get, kind.split()[-1], where)
    raise PissaError(f"{where} is quantised as {kind}, which pissa cannot dequantise; pass the unquantised "
                     "model, or one quantised with bitsandbytes (nf4, fp4, int8) or MLX (affine)")


def _mlx_view(shapes, get, bits, group, dtypes):
    logical: dict[str, tuple[int, ...]] = {}
    modules = {n[: -len(".scales")] for n in shapes if n.endswith(".scales")}
    for n, shape in shapes.items():
        m = n.rsplit(".", 1)[0]
        if m in modules and n != f"{m}.weight":
            continue
        logical[n] = (shape[0], shape[1] * 32 // bits) if m in modules else shape
    s = QuantScheme("affine", "affine", bits, group)

    def read(name: str) -> np.ndarray:
        m = name[: -len(".weight")]
        if m not in modules or not name.endswith(".weight"):
            return get(name)
        qt = QTensor(s, unpack_bits(get(name), bits), np.asarray(get(f"{m}.scales"), np.float32),
                     np.asarray(get(f"{m}.biases"), np.float32), dtypes.get(f"{m}.scales", "float32"))
        from pissa.numeric.quant import dequantize

        return dequantize(qt)
    return logical, read


def _bnb_view(shapes, get, kind, where):
    logical: dict[str, tuple[int, ...]] = {}
    states: dict[str, dict] = {}
    for n in shapes:
        if ".weight.quant_state.bitsandbytes__" in n:
            m = n.split(".weight.quant_state.")[0]
            states[m] = json.loads(bytes(np.asarray(get(n), dtype=np.uint8)).decode())
    int8 = {n[: -len(".SCB")] for n in shapes if n.endswith(".SCB")}
    for n, shape in shapes.items():
        m = n.rsplit(".", 1)[0]
        base = n.split(".weight.")[0] if ".weight." in n else None
        if base in states or (m in int8 and n != f"{m}.weight"):
            continue
        if n.endswith(".weight") and n[: -len(".weight")] in states:
            logical[n] = tuple(states[n[: -len(".weight")]]["shape"])
        else:
            logical[n] = shape

    def read(name: str) -> np.ndarray:
        m = name[: -len(".weight")] if name.endswith(".weight") else None
        if m in int8:
            w = np.asarray(get(name), dtype=np.float32)
            return w * (np.asarray(get(f"{m}.SCB"), np.float32)[:, None] / np.float32(127))
        if m not in states:
            return get(name)
        st = states[m]
        qt = st["quant_type"]
        if qt not in ("nf4", "fp4"):
            raise PissaError(f"{where}: {m} is stored as bitsandbytes {qt}, which pissa cannot dequantise")
        packed = np.asarray(get(name)).view(np.uint8).reshape(-1)
        codes = np.empty(packed.size * 2, np.uint8)
        codes[0::2], codes[1::2] = packed >> 4, packed & 15
        n = int(np.prod(st["shape"]))
        block = int(st["blocksize"])
        absmax = np.asarray(get(f"{name}.absmax"))
        if "nested_blocksize" in st:  # double quantisation: absmax itself is 8-bit blockwise
            nested = np.asarray(get(f"{name}.nested_absmax"), np.float32)
            nmap = np.asarray(get(f"{name}.nested_quant_map"), np.float32)
            nb = int(st["nested_blocksize"])
            vals = nmap[absmax.astype(np.int64)]
            vals = (np.pad(vals, (0, -len(vals) % nb)).reshape(-1, nb) * nested[:, None]).reshape(-1)[: len(absmax)]
            absmax = vals + np.float32(st.get("nested_offset", 0.0))
        absmax = absmax.astype(np.float32)
        levels = np.asarray(get(f"{name}.quant_map"), np.float32) if f"{name}.quant_map" in shapes else (
            NF4_LEVELS if qt == "nf4" else BNB_FP4_LEVELS)
        vals = levels[codes[:n]]
        vals = np.pad(vals, (0, -n % block)).reshape(-1, block) * absmax[:, None]
        # dequantize_4bit returns the quant state's dtype: one rounding of the float32 product.
        dtype = st.get("dtype") if st.get("dtype") in ("bfloat16", "float16") else "float32"
        return round_to(vals.reshape(-1)[:n].reshape(st["shape"]), dtype)
    return logical, read


def scheme_of(config: Mapping) -> QuantScheme | None:
    """The QPiSSA scheme recorded in a config.json we wrote, or None."""
    ours = config.get("pissa_quantization")
    if not isinstance(ours, dict):
        return None
    return make_scheme(ours["scheme"], int(ours["group_size"]))
