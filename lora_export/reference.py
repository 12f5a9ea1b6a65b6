"""The reference an export is judged against: the adapted model as it was trained, defined by numbers.

For a QLoRA adapter that is: every 4-bit layer's weight exactly as trained (its NF4/FP4 codes and block
scales, made by bitsandbytes from the base with the settings recorded at training time), dequantized
into an fp32 ``nn.Linear`` (once; for a model read a layer at a time, at each read, with the same numbers); the
other weights as in the base; the adapter(s) attached unmerged through PEFT; everything computed in fp32 on the
CPU. For a plain LoRA adapter: the fp32 base plus the adapter(s). Several adapters are all active at once, each
output scaled by its weight (PEFT's unmerged linear combination).

bitsandbytes only quantizes and dequantizes here; none of its matmul kernels runs. Its kernels are picked
by hardware (bf16 through ``gemv_4bit`` on CPUs with AVX512-BF16 at inference, a batch-1 kernel and the
compute dtype on CUDA), so a reference computed through them would be a different model on different
machines. The dequantized weights are bit for bit the ones bitsandbytes' fp32 path multiplies with
(``tests/test_reference.py`` checks it, and spies that no bitsandbytes op runs in a reference forward).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from .adapters import Adapter, attach
from .base import Nf4Settings, load_fp32
from .nf4math import round_trip
from .quantized_base import quantization_of

COMPUTE_DTYPE = "float32"
DEVICE = "cpu"
# Models whose fp32 weights exceed this (about 1.3B parameters) are run a unit at a time from disk (``layerwise``):
# the whole model's logits bit for bit on the same batch (parity gives it every sequence in one batch, which moves
# fp32 sums by a few ulps), one decoder layer in memory, but every forward reads the weights again (at Llama-3.1-8B
# widths with 2 layers parity's reference took 157 s instead of 37 s), so smaller models, which fit the memory of
# the CI runners users have (whole: 0.8 GB + 1.05x their fp32 bytes, memory.VALIDATE), stay whole. A fixed size, not
# the machine's memory, picks it, so that a model is computed the same way on every machine.
LAYERWISE_ABOVE = 5 * 1024**3
LAYERWISE_LOGIT_BYTES = 1 << 30  # logits one pass of a layerwise model may produce: every parity sequence at 8B


def layerwise_for(params: int) -> bool:
    """Whether parity runs a model of ``params`` weights layer by layer from disk."""
    return 4 * params > LAYERWISE_ABOVE


def as_trained_dir(work: Path, params: int) -> Path | None:
    """Where the merge writes the base as trained (fp32) for the reference to load, or None above the layerwise
    size: a layerwise reference dequantizes each 4-bit layer as it reads it (4 bytes per weight less disk)."""
    return None if layerwise_for(params) else Path(work) / "as-trained"


def rounds_base(adapter: Adapter) -> bool:
    """Whether the base as trained is the base's 4-bit layers rounded through NF4/FP4 (a pre-quantized base comes
    dequantized: nothing to round)."""
    return adapter.trained_on_4bit and not adapter.quantization.prequantized


def dequantize_layers(model, modules: Sequence[str], nf4: Nf4Settings) -> None:
    """Replace each named linear layer's weight by dequant(quant_4bit(W)), once, in place (fp32)."""
    import torch

    layers = dict(model.named_modules())
    with torch.no_grad():
        for name in modules:
            linear = layers[name]
            linear.weight.data = round_trip(linear.weight.data, nf4).to(torch.float32)


def load_base_as_trained(base_dir: Path, adapter: Adapter):
    """The base exactly as the adapter saw it in training, as a plain fp32 transformers model."""
    model = load_fp32(base_dir)
    if rounds_base(adapter):
        dequantize_layers(model, *quantization_of(adapter))
    return model


def load_adapted(base_dir: Path, adapters: Adapter | Sequence[Adapter], weights: Sequence[float] | None = None,
                 as_trained: Path | None = None):
    """The reference model: the base as trained plus the adapter(s), unmerged, fp32, on the CPU.

    ``as_trained``: that base already written to disk by the merge (``merge(..., as_trained_dir=...)``, the
    same numbers): it is then memory-mapped instead of quantized and dequantized again in memory."""
    adapters = [adapters] if isinstance(adapters, Adapter) else list(adapters)
    model = load_fp32(as_trained) if as_trained else load_base_as_trained(base_dir, adapters[0])
    return attach(model, adapters, weights)[0].eval()


def describe(adapters: Sequence[Adapter]) -> str:
    """What the reference is, for the report: weights, adapters, compute dtype and device."""
    first = adapters[0]
    if first.trained_on_4bit:
        nf4 = quantization_of(first)[1]
        stored = "the pre-quantized base's stored" if first.quantization.prequantized else "4-bit"
        base = (f"{nf4.quant_type.upper()} base as trained (block {nf4.blocksize}, double quant "
                f"{'on' if nf4.double_quant else 'off'}; {stored} codes dequantized once)")
    else:
        base = "fp32 base"
    count = "adapter" if len(adapters) == 1 else f"{len(adapters)} adapters"
    return f"{base} + {count} unmerged, computed in {COMPUTE_DTYPE} on {DEVICE} (PyTorch)"


def reference_model(base: Path, adapters, weights, as_trained: Path | None, layerwise: bool = False):
    """The reference as a ``runtime.TorchCausalLM`` (what parity measures the export against); ``layerwise``: its
    weights read a unit at a time at its forward (``layerwise.load``) from ``as_trained``, or from the base, each
    4-bit layer dequantized as it is read (a layerwise export writes no as-trained copy: ``as_trained_dir``)."""
    from .runtime import TorchCausalLM

    adapters = list(adapters)
    if layerwise:
        if as_trained is None and rounds_base(adapters[0]):
            # no fp32 copy of the base as trained (32 GB at 8B): each 4-bit layer rounded as it is read
            return _layerwise(base, adapters, weights, quantization_of(adapters[0]))
        return _layerwise(as_trained or base, adapters, weights)
    return TorchCausalLM(load_adapted(base, adapters, weights, as_trained=as_trained))


def torch_model(checkpoint: Path, layerwise: bool = False):
    """A plain fp32 checkpoint (the merge, or the base) as a ``runtime.TorchCausalLM``: parity's comparison models."""
    from .runtime import TorchCausalLM

    return _layerwise(checkpoint, (), None) if layerwise else TorchCausalLM(load_fp32(checkpoint))


def _layerwise(checkpoint: Path, adapters, weights, rounding=None):
    from . import layerwise
    from .runtime import TorchCausalLM

    model = TorchCausalLM(layerwise.load(checkpoint, adapters, weights, rounding))
    model.rows_per_pass = LAYERWISE_LOGIT_BYTES // (4 * model.model.config.get_text_config().vocab_size)
    return model
