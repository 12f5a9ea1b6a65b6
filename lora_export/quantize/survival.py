"""How much of the fine-tuning survives weight quantization, tensor by tensor.

For every quantized MatMul of an export whose weight the adapters changed (W' = W + dW):

    quant_error = ||Q(W') - W'|| / ||W'||
    survival    = 1 - ||Q(W') - Q(W) - dW|| / ||dW||     (1: the change is kept; 0 or less: erased)

Q(W') is read back from the exported graph itself; Q(W) is the base weight quantized the same way (same
bits, block size, symmetry, NF4 type) by ONNX Runtime's own quantizers. MatMulBnb4 weights are dequantized by
running that contrib op on an identity matrix: the figures are what the runtime computes with. MatMulNBits
weights are unpacked by its documented layout instead (``unpack_nbits``), because the identity costs K x K x N
multiply-adds: 1.7e12 for one down projection of an 8B model, hours for a whole one on two cores. The unpacking is
tested equal, bit for bit, to the runtime's own op on an identity matrix (tests/test_quantize.py).
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..checkpoint import CheckpointTensors

QUANTIZED_OPS = ("MatMulNBits", "MatMulBnb4")
ERASED = 0.5  # survival below this: most of the adapter's change in that tensor is gone
CHUNK_ELEMENTS = 1 << 24  # rows of a weight compared at a time: 64 MB of fp32 (an 8B lm_head is 2.1 GB)


class GraphWeights:
    """A model.onnx's initializers by name, each read from its external data file when asked for and dropped after
    use: an 8B int4 graph is 5+ GB, and loading it whole doubled the peak of the checks below. A mapping of names
    to TensorProtos holding their data, as the functions here take."""

    def __init__(self, model_path: Path):
        import onnx

        self.model = onnx.load(str(model_path), load_external_data=False)
        self.folder = str(Path(model_path).parent)
        self.protos = {i.name: i for i in self.model.graph.initializer}

    def __contains__(self, name) -> bool:
        return name in self.protos

    def __getitem__(self, name):
        import onnx
        from onnx.external_data_helper import load_external_data_for_tensor, uses_external_data

        t = self.protos[name]
        if not uses_external_data(t):
            return t
        copy = onnx.TensorProto()
        copy.CopyFrom(t)
        load_external_data_for_tensor(copy, self.folder)
        copy.data_location = onnx.TensorProto.DEFAULT
        del copy.external_data[:]
        return copy


def row_chunks(n: int, k: int):
    """Slices of the N rows of an N x K weight, about CHUNK_ELEMENTS at a time."""
    step = max(1, CHUNK_ELEMENTS // max(k, 1))
    return [slice(i, min(i + step, n)) for i in range(0, n, step)]


@dataclass(frozen=True)
class TensorSurvival:
    """One quantized MatMul the adapters changed: its error and how much of their change it kept."""

    node: str
    modules: tuple[str, ...]
    bits: int
    quant_error: float
    survival: float


@dataclass(frozen=True)
class SurvivalReport:
    scheme: str
    tensors: list[TensorSurvival] = field(default_factory=list)

    @property
    def min_survival(self) -> float | None:
        return min((t.survival for t in self.tensors), default=None)

    @property
    def median_survival(self) -> float | None:
        return statistics.median(t.survival for t in self.tensors) if self.tensors else None

    @property
    def erased(self) -> list[TensorSurvival]:
        return [t for t in self.tensors if t.survival < ERASED]

    def to_dict(self) -> dict:
        return {"scheme": self.scheme, "adapted_quantized_tensors": len(self.tensors),
                "median_survival": self.median_survival, "min_survival": self.min_survival,
                "erased_below": ERASED, "erased": [t.node for t in self.erased],
                "tensors": [asdict(t) for t in self.tensors]}


def candidate_modules(node_name: str, keys: set[str]) -> tuple[str, ...] | None:
    """'/model/layers.0/attn/qkv_proj/MatMul_Q4' -> the checkpoint modules whose rows it packs."""
    path = ".".join(node_name.strip("/").split("/")[:-1]).replace(".attn.", ".self_attn.")
    if f"{path}.weight" in keys:
        return (path,)
    head, _, last = path.rpartition(".")
    packed = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}.get(last)
    if packed and all(f"{head}.{p}.weight" in keys for p in packed):
        return tuple(f"{head}.{p}" for p in packed)
    return None


def nbits_arrays(node, initializers) -> tuple:
    """(attributes, packed B [N, blocks, blob], scales [N, blocks, 1], zero points as stored or None) of a
    MatMulNBits node: read once, then unpacked a slice of rows at a time by ``unpack_nbits``."""
    from onnx import helper, numpy_helper

    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    n, blocks = attrs["N"], -(-attrs["K"] // attrs["block_size"])
    packed = numpy_helper.to_array(initializers[node.input[1]]).reshape(n, blocks, -1)
    scales = numpy_helper.to_array(initializers[node.input[2]]).reshape(n, blocks, 1)
    zp_name = node.input[3] if len(node.input) > 3 else ""
    zp = numpy_helper.to_array(initializers[zp_name]).reshape(n, -1) if zp_name else None
    return attrs, packed, scales, zp


def unpack_nbits(node, initializers, rows: slice | None = None, arrays: tuple | None = None):
    """W (N x K, fp32) of a MatMulNBits node, from its contrib op's documented layout: B uint8 [N, blocks, blob]
    (4 bits: two values a byte, the low nibble first), scales [N x blocks], zero points packed the same way per row
    (absent: 2^(bits-1)); W = (q - zero point) x scale, in the scales' type, as the op computes it.
    ``rows``: only those rows of W (each row is quantized on its own, so a slice is exact); ``arrays``: what
    ``nbits_arrays`` read. Written by hand: ONNX Runtime has no dequantizer for this layout."""
    import numpy as np

    attrs, packed, scales, zp = arrays or nbits_arrays(node, initializers)
    bits, k = attrs.get("bits", 4), attrs["K"]
    blocks = packed.shape[1]
    rows = rows or slice(0, attrs["N"])
    packed = packed[rows]
    half = scales.dtype == np.float16
    scales = scales[rows].astype(np.float32)
    n = packed.shape[0]
    if bits == 4:
        q = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(n, blocks, -1)
    elif bits == 8:
        q = packed
    else:
        raise ValueError(f"{node.name}: MatMulNBits with {bits} bits (4 and 8 are unpacked here)")
    if zp is not None:
        if zp.dtype != np.uint8:
            raise ValueError(f"{node.name}: zero points of type {zp.dtype} (packed uint8 ones are unpacked here)")
        zp = zp[rows]
        if bits == 4:
            zp = np.stack([zp & 0x0F, zp >> 4], axis=-1).reshape(n, -1)
        zp = zp[:, :blocks].reshape(n, blocks, 1).astype(np.float32)
    else:
        zp = np.float32(1 << (bits - 1))
    w = (q.astype(np.float32) - zp) * scales  # exact in fp32 for fp16 scales: a small integer times 11 bits
    if half:  # an fp16 graph's op computes in fp16: the product rounded once
        w = w.astype(np.float16).astype(np.float32)
    return np.ascontiguousarray(w.reshape(n, -1)[:, :k])


def _dequantize(node, initializers: dict, k: int):
    """W (N x K) as the runtime sees it: MatMulNBits unpacked (``unpack_nbits``), other ops applied to an identity
    matrix on ONNX Runtime."""
    if node.op_type == "MatMulNBits":
        return unpack_nbits(node, initializers)
    return run_on_identity(node, initializers, k)


def run_on_identity(node, initializers: dict, k: int):
    """W (N x K) as the runtime computes with it: the quantized op applied to an identity matrix, on ONNX Runtime."""
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper

    inits = [initializers[i] for i in node.input[1:] if i in initializers]
    dtype = inits[-1].data_type if node.op_type == "MatMulBnb4" else inits[1].data_type  # the scales' type
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute if a.name != "accuracy_level"}
    inputs = ["X"] + list(node.input[1:])
    op = helper.make_node(node.op_type, inputs, ["Y"], domain="com.microsoft", **attrs)
    graph = helper.make_graph([op], "dequantize", [helper.make_tensor_value_info("X", dtype, [k, k])],
                              [helper.make_tensor_value_info("Y", dtype, None)], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = min(model.ir_version, 10)
    np_dtype = np.float16 if dtype == TensorProto.FLOAT16 else np.float32
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    out = session.run(None, {"X": np.eye(k, dtype=np_dtype)})[0]
    return out.astype(np.float32).T


def _quantize_like(node, w, bits: int, fp16: bool = False):
    """Quantize W (N x K) as ``node`` was quantized, with ONNX Runtime's quantizer for that op; ``fp16``: from W in
    fp16, as a graph of fp16 activations (the CUDA targets') holds it before the quantizer sees it."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    n, k = w.shape
    dtype, elem = (np.float16, TensorProto.FLOAT16) if fp16 else (np.float32, TensorProto.FLOAT)
    weight = numpy_helper.from_array(np.ascontiguousarray(w.T.astype(dtype)), "W")
    graph = helper.make_graph([helper.make_node("MatMul", ["X", "W"], ["Y"], name="m")], "q",
                              [helper.make_tensor_value_info("X", elem, [1, k])],
                              [helper.make_tensor_value_info("Y", elem, [1, n])], initializer=[weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    if node.op_type == "MatMulBnb4":
        from onnxruntime.quantization.matmul_bnb4_quantizer import MatMulBnb4Quantizer

        q = MatMulBnb4Quantizer(model, quant_type=attrs["quant_type"], block_size=attrs["block_size"])
    else:
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        symmetric = len([i for i in node.input if i]) < 4  # no zero points: symmetric
        q = MatMulNBitsQuantizer(model, bits=bits, block_size=attrs["block_size"], is_symmetric=symmetric)
    q.process()
    qmodel = q.model.model
    qnode = next(x for x in qmodel.graph.node if x.op_type == node.op_type)
    return _dequantize(qnode, {i.name: i for i in qmodel.graph.initializer}, k)


def measure_survival(export_dir: Path, checkpoint: Path, base_dir: Path, adapters, merge_base: str,
                     quantization) -> SurvivalReport:
    """Per quantized tensor of the export at ``export_dir``: quantization error and adapter survival."""
    import numpy as np
    import torch

    from ..nf4math import round_trip
    from ..quantized_base import quantization_of

    merged, base = CheckpointTensors(checkpoint), CheckpointTensors(base_dir)
    # ``base_dir`` is in full precision: a pre-quantized base arrives dequantized, with nothing to round again
    quant = adapters[0].quantization
    quantized, nf4 = quantization_of(adapters[0]) if merge_base != "original" and not quant.prequantized else ([], None)
    quantized = set(quantized)

    def original(module: str):
        w = base.get(f"{module}.weight")
        return round_trip(w, nf4) if nf4 and module in quantized else w

    inits = GraphWeights(Path(export_dir) / "model.onnx")
    report = SurvivalReport(scheme=quantization.scheme)
    for node in inits.model.graph.node:
        if node.op_type not in QUANTIZED_OPS:
            continue
        modules = candidate_modules(node.name, set(merged.keys) & set(base.keys))
        if modules is None:
            continue  # e.g. a tied lm_head, stored once as the embedding: no adapter change to measure
        w_new = torch.cat([merged.get(f"{m}.weight") for m in modules]).numpy()
        w_old = torch.cat([original(m) for m in modules]).numpy()
        if not np.any(w_new != w_old):
            continue
        # with the training's own scales, Q(W) is the trained 4-bit weight itself: dequant(NF4(W))
        kept = quantization.scales == "original" and nf4 is not None and set(modules) <= quantized
        report.tensors.append(tensor_survival(node, inits, w_old, w_new, modules, q_old=w_old if kept else None))
    return report


def tensor_survival(node, initializers, w_old, w_new, modules: tuple[str, ...] = (), q_old=None) -> TensorSurvival:
    """Survival of the change ``w_new - w_old`` (N x K, fp32) through the quantized ``node`` holding Q(w_new); a
    MatMulNBits weight a slice of rows at a time (its rows are quantized independently; norms summed)."""
    import numpy as np
    from onnx import helper

    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    bits = attrs.get("bits", 4)
    n, k = w_new.shape
    if node.op_type == "MatMulNBits":
        arrays = nbits_arrays(node, initializers)
        parts = row_chunks(n, k)
    else:  # MatMulBnb4's blocks run over the flattened weight: the whole of it at once
        arrays, parts = None, [slice(0, n)]
    sums = np.zeros(4)  # ||Q(W') - W'||^2, ||W'||^2, ||Q(W') - Q(W) - dW||^2, ||dW||^2
    for rows in parts:
        q_new = unpack_nbits(node, initializers, rows, arrays) if arrays else _dequantize(node, initializers, k)
        new, old = w_new[rows], w_old[rows]
        q_o = q_old[rows] if q_old is not None else _quantize_like(node, old, bits)
        dw = new - old
        sums += [_sq(q_new - new), _sq(new), _sq(q_new - q_o - dw), _sq(dw)]
    return TensorSurvival(node=node.name, modules=modules, bits=bits,
                          quant_error=float(np.sqrt(sums[0] / sums[1])),
                          survival=float(1.0 - np.sqrt(sums[2] / sums[3])))


def _sq(x) -> float:
    import numpy as np

    return float(np.vdot(x, x))  # the squared Frobenius norm, accumulated in float64 by numpy's dot


# a right export measures exactly 0 (fp32 and fp16 graphs: the quantizer sees W in the graph's float type, as the
# builder's did; quantized from fp32 W instead, an fp16 graph measured up to 0.013); every block scale 8/7 off
# measures 0.14, a 25% noise on one layer's scales 0.25 (SmolLM2-135M, README "A real pretrained model")
REQUANTIZED_RTOL = 1e-2


def off_source(model_path: Path, checkpoint: Path) -> tuple[int, int, str]:
    """The graph's MatMulNBits weights against what ONNX Runtime's quantizer makes of the checkpoint the graph was
    built from (same bits, block size, symmetry: the builder's round-to-nearest): (MatMuls compared, those off by
    more than REQUANTIZED_RTOL relative, the worst one's name and error). A graph whose weights were edited, or
    quantized from other weights, is off whatever its logits say: beneath int4's own loss on a small model a
    perturbed layer can stay inside every threshold (README, "A real pretrained model"). Weights no checkpoint
    tensor maps to (a tied lm_head) are not compared."""
    import logging

    import numpy as np
    import torch
    from onnx import helper
    from onnxruntime.quantization import matmul_nbits_quantizer

    # its INFO line per quantized MatMul would flood the command's output (this runs in a child process)
    logging.getLogger(matmul_nbits_quantizer.__name__).setLevel(logging.WARNING)
    source = CheckpointTensors(checkpoint)
    inits = GraphWeights(Path(model_path))
    compared, off, worst = 0, 0, (0.0, "")
    for node in inits.model.graph.node:
        modules = candidate_modules(node.name, source.keys) if node.op_type == "MatMulNBits" else None
        if modules is None:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        w = torch.cat([source.get(f"{m}.weight") for m in modules]).numpy()
        arrays = nbits_arrays(node, inits)
        fp16 = arrays[2].dtype == np.float16  # the graph's scales: its float type
        diff = total = 0.0
        for rows in row_chunks(*w.shape):
            q_graph = unpack_nbits(node, inits, rows, arrays)
            q_source = _quantize_like(node, w[rows], attrs.get("bits", 4), fp16)
            diff, total = diff + _sq(q_graph - q_source), total + _sq(q_source)
        err = float(np.sqrt(diff) / max(np.sqrt(total), 1e-30))
        compared, off, worst = compared + 1, off + (err > REQUANTIZED_RTOL), max(worst, (err, node.name))
        del w, arrays
    return compared, off, f"{worst[1]} ({worst[0]:.2g})"
