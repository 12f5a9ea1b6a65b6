"""Merge LoRA adapters into the base weights, in fp32, with PEFT's own semantics, shard by shard.

The merge base matters for QLoRA: the adapter was trained against dequant(NF4(W)), not W. Merging into
W adds the 4-bit quantization error back; merging into dequant(NF4(W)), reproduced with bitsandbytes and
the exact settings recorded at training time, gives back the trained model. ``nf4`` is the default for
adapters trained on a 4-bit base; ``original`` is offered and recorded, and parity measures either.

Streaming: the base is never loaded whole. PEFT builds its adapted model around a *hollow* skeleton (every
base parameter a zero-stride view of one scalar, so the skeleton costs nothing), loads the adapters'
real weights into it, and then each base tensor is read from its safetensors shard, put into its module,
merged by that module's own PEFT ``merge()`` (scaling alpha/r or alpha/sqrt(r), rank/alpha patterns,
DoRA, fan_in_fan_out, embeddings), and written out tensor by tensor (``tensorfile``). Peak memory is
about the largest tensor a few times over plus the adapters. The result is bit-identical to PEFT's ``merge_and_unload`` on the whole model (tested).

Written by hand because no library merges without loading the whole model: PEFT and transformers both
materialise every weight first.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

from . import tensorfile
from .adapters import Adapter, attach, saved_layer_weights
from .base import Nf4Settings, config_of, load_tokenizer, skeleton
from .checkpoint import shard_files, shard_names, write_fp32_config, write_index
from .errors import BadInput
from .manifests import MERGE_BASES
from .nf4math import round_trip
from .outputs import check_free_disk
from .progress import Progress, quiet
from .quantized_base import FOUR_BIT, quantization_of


@dataclass(frozen=True)
class MergeResult:
    checkpoint: Path
    merge_base: str
    changed: tuple[str, ...]  # modules whose weight the adapters' LoRA changed
    max_abs_delta: float  # the largest |change| of any merged weight
    replaced: tuple[str, ...] = ()  # modules_to_save: weights the adapter replaced outright
    untied: bool = False  # tied embeddings untied because the adapter changed one side only
    weights: tuple[float, ...] = (1.0,)  # the linear combination's coefficient per adapter
    shards: int = 1
    as_trained: Path | None = None  # the base as the adapter saw it (dequant(NF4(W))), when asked for


def default_merge_base(adapter: Adapter) -> str:
    return adapter.quantization.settings.quant_type if adapter.trained_on_4bit else "original"


def _hollow(model) -> None:
    """Make every parameter a zero-stride CPU view of one scalar: right shapes and dtypes, no memory."""
    import torch

    for module in model.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            setattr(module, name, torch.nn.Parameter(torch.zeros((), dtype=p.dtype).expand(p.shape),
                                                     requires_grad=False))


def _peft_skeleton(base_dir: Path, adapters: Sequence[Adapter], weights: Sequence[float]):
    """PEFT's adapted model around a hollow base, with every adapter loaded and scaled."""
    import torch

    config = config_of(base_dir)
    hollow = skeleton(base_dir, config, dtype=torch.float32)
    _hollow(hollow)
    model, names = attach(hollow, adapters, weights, low_cpu_mem_usage=True)
    return model, names, config


def _check_combination(adapters: Sequence[Adapter], weights: Sequence[float], merge_base: str) -> None:
    if len(weights) != len(adapters):
        raise BadInput.one("--adapter-weight", f"{len(weights)} weights for {len(adapters)} adapters",
                           "give one weight per adapter, in the same order")
    if len(adapters) > 1:
        for a in adapters:
            if not a.plain_lora or a.layer_weights:
                raise BadInput.one(str(a.path / "adapter_config.json"), "DoRA and modules_to_save adapters cannot "
                                   "be combined linearly with others, nor can saved embedding layers (their merge is not "
                                   "a sum of deltas)",
                                   "export this adapter on its own")
        if merge_base in FOUR_BIT:
            settings = {a.quantization.key() if a.quantization else None for a in adapters}
            if len(settings) > 1:
                raise BadInput.one(str(adapters[1].path), "the adapters were trained against different 4-bit "
                                   "bases, so no single nf4 merge base serves them all",
                                   "export these adapters one at a time")
    if merge_base not in MERGE_BASES:
        raise BadInput.one("--merge-base", f"unknown merge base '{merge_base}'", f"use one of {', '.join(MERGE_BASES)}")
    if merge_base in FOUR_BIT and not adapters[0].trained_on_4bit:
        raise BadInput.one(str(adapters[0].path), f"merge base {merge_base} needs the 4-bit settings the adapter was "
                           "trained with, and none were resolved", "use --merge-base original")


def _check_free_disk(shards: list[Path], out_dir: Path) -> None:
    """The fp32 output may be up to twice a 16-bit base; refuse before writing rather than fail half-way."""
    check_free_disk(out_dir, int(1.1 * 2 * sum(p.stat().st_size for p in shards)), "the merged fp32 checkpoint")


def merge(base_dir: Path, adapters: Adapter | Sequence[Adapter], out_dir: Path, merge_base: str,
          weights: Sequence[float] | None = None, progress: Progress = quiet,
          as_trained_dir: Path | None = None) -> MergeResult:
    """Merge ``adapters`` (combined linearly with ``weights``, default 1 each) into the base, streaming shard
    by shard, and write an fp32 safetensors checkpoint (config without quantization_config, tokenizer) to
    ``out_dir``. Sanity checks: every LoRA-targeted weight changed, every tensor finite.

    ``as_trained_dir``: for a QLoRA adapter, also write the base as it was trained against (every 4-bit
    layer dequant(NF4(W)), the rest as in the base, fp32) in the same pass: the parity reference loads it
    instead of quantizing every weight again."""
    adapters = [adapters] if isinstance(adapters, Adapter) else list(adapters)
    weights = tuple(float(w) for w in (weights or [1.0] * len(adapters)))
    _check_combination(adapters, weights, merge_base)
    quant = adapters[0].quantization
    if quant is None or quant.prequantized:
        # the base itself is what a plain LoRA adapter was trained against; for a pre-quantized base, ``base_dir``
        # is its dequantized copy (``quantized_base.plain_base``): the codes as trained, nothing to round again
        result = rewrite_checkpoint(base_dir, adapters, weights, out_dir, "original", progress)
        return replace(result, merge_base=merge_base, as_trained=Path(base_dir) if quant else None)
    return rewrite_checkpoint(base_dir, adapters, weights, out_dir, merge_base, progress,
                              nf4=quantization_of(adapters[0]) if as_trained_dir else None,
                              as_trained_dir=as_trained_dir)


def rewrite_checkpoint(base_dir: Path, adapters: Sequence[Adapter], weights: Sequence[float], out_dir: Path,
                       merge_base: str, progress: Progress = quiet,
                       nf4: tuple[list[str], Nf4Settings] | None = None,
                       as_trained_dir: Path | None = None) -> MergeResult:
    """The streaming pass. With no adapters it writes the base itself (after the NF4 round trip given by
    ``nf4``): the base an unmerged side-path graph needs. With ``as_trained_dir`` it also writes the base
    after the round trip (given by ``nf4``) next to the merge, from the same reads."""
    base_dir, out_dir = Path(base_dir), Path(out_dir)
    shards = shard_files(base_dir)
    _check_free_disk(shards, out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    headers = [tensorfile.read_header(p)[0] for p in shards]
    pass_ = _plan_pass(base_dir, adapters, weights, merge_base, nf4, as_trained_dir, headers)
    files, weight_map, trained_map = _stream_shards(pass_, shards, headers, out_dir, as_trained_dir, progress)
    _write_index(out_dir, files, weight_map)
    _check_merged(pass_, adapters[0].path if adapters else base_dir)
    _write_merged_files(base_dir, out_dir, pass_.untie)
    if as_trained_dir:
        _write_as_trained_files(base_dir, as_trained_dir, trained_map)
    return MergeResult(checkpoint=out_dir, merge_base=merge_base, changed=tuple(sorted(pass_.deltas)),
                       max_abs_delta=max(pass_.deltas.values(), default=0.0), replaced=tuple(sorted(pass_.replaced)),
                       untied=pass_.untie, weights=tuple(weights), shards=len(files), as_trained=as_trained_dir)


@dataclass
class _Pass:
    """One streaming pass: the (hollow) model whose layers merge each tensor as it streams by, what to round
    through NF4, and the tallies of what the merge did."""

    modules: dict  # name -> module of the base model (inside PEFT's wrapper when there are adapters)
    names: list[str]  # the adapters' names in PEFT (a0, a1, ...)
    lora: dict  # name -> LoraLayer
    saved: dict  # name -> ModulesToSaveWrapper
    prefix: str  # the base model prefix, for checkpoints saved without it
    in_name: str | None  # the input embedding's module
    out_name: str | None  # the output embedding's module
    untie: bool  # tied embeddings the adapter changes on one side: stored apart
    layer_weights: dict  # base parameter -> the adapter's saved copy
    rounding: tuple[list[str], Nf4Settings] | None  # (4-bit modules, settings) of the NF4 round trip
    round_trip_in_merge: bool  # merge into the rounded weights (nf4 base, or the base alone); else the original
    quantized: frozenset = frozenset()  # the modules of ``rounding``
    deltas: dict[str, float] = field(default_factory=dict)  # module -> largest |change| of its weight
    replaced: list[str] = field(default_factory=list)
    bad: list[str] = field(default_factory=list)  # non-finite merged tensors

    def outputs(self, key: str) -> list[tuple[str, str]]:
        """(module, param) outputs of one base tensor: two for the embedding of a model being untied."""
        module_name, _, param = key.rpartition(".")
        if module_name not in self.modules and self.prefix and f"{self.prefix}.{module_name}" in self.modules:
            module_name = f"{self.prefix}.{module_name}"  # a checkpoint saved without the base prefix
        both = self.untie and module_name == self.in_name and param == "weight"
        return ([(self.out_name, "weight")] if both else []) + [(module_name, param)]

    def rounded(self, module_name: str, param: str) -> bool:
        return self.rounding is not None and module_name in self.quantized and param == "weight"

    def merged(self, module_name: str, param: str, t):
        """One output tensor: merged by its LoRA layer's own PEFT merge(), or the adapter's saved copy, in fp32."""
        import torch

        if module_name in self.lora and param == "weight":
            layer = self.lora[module_name]
            original = t.clone()
            layer.base_layer.weight = torch.nn.Parameter(t, requires_grad=False)
            layer.merge(adapter_names=[n for n in self.names if n in layer.scaling])
            t = layer.base_layer.weight.detach()
            self.deltas[module_name] = (t - original).abs().max().item()
            del original
            layer.base_layer.weight = torch.nn.Parameter(torch.zeros(()).expand(t.shape), requires_grad=False)
        elif module_name in self.saved:
            wrapper = self.saved[module_name]
            t = dict(wrapper.modules_to_save[wrapper.active_adapters[0]].named_parameters())[param].detach()
            self.replaced.append(module_name)
        if t.is_floating_point():
            t = t.to(torch.float32)  # merge math and the merged checkpoint are fp32
            if not torch.isfinite(t).all():
                self.bad.append(f"{module_name}.{param}")
        return t


def _pass_model(base_dir: Path, adapters: Sequence[Adapter], weights: Sequence[float]):
    """(the model the pass merges with, the adapters' names, its config): PEFT's adapted model around a hollow
    base, or with no adapters the bare base on the meta device."""
    if adapters:
        model, names, config = _peft_skeleton(base_dir, adapters, weights)
        return model.base_model.model, names, config
    config = config_of(base_dir)
    return skeleton(base_dir, config), [], config


def _plan_pass(base_dir: Path, adapters: Sequence[Adapter], weights: Sequence[float], merge_base: str,
               nf4: tuple[list[str], Nf4Settings] | None, as_trained_dir: Path | None, headers: list) -> _Pass:
    """The model, the modules that merge or are replaced, tied embeddings, the round trip: checked before any
    tensor is written (an FP8 base, a saved layer the base does not store)."""
    import torch
    from peft.tuners.lora import LoraLayer
    from peft.utils import ModulesToSaveWrapper

    inner, names, config = _pass_model(base_dir, adapters, weights)
    if adapters and (merge_base in FOUR_BIT or as_trained_dir):
        nf4 = quantization_of(adapters[0])  # the adapter's own record decides the round trip
    modules = dict(inner.named_modules())
    lora = {n: m for n, m in modules.items() if isinstance(m, LoraLayer)}
    saved = {n: m for n, m in modules.items() if isinstance(m, ModulesToSaveWrapper)}

    # Tied input/output embeddings: when the adapter changes one side only, the two must be stored apart.
    in_emb, out_emb = inner.get_input_embeddings(), inner.get_output_embeddings()
    in_name = next((n for n, m in modules.items() if m is in_emb), None)
    out_name = next((n for n, m in modules.items() if out_emb is not None and m is out_emb), None)
    fp8 = next((e.name for entries in headers for e in entries if e.dtype.startswith("F8")), None)
    if fp8:
        raise BadInput.one(str(base_dir), f"an FP8 checkpoint ({fp8}): its weights need their scales to mean "
                           "anything, and merging into them is not supported", "merge into the bf16/fp16 original")
    base_keys = {e.name for entries in headers for e in entries}
    tied = bool(in_name and out_name and f"{out_name}.weight" not in base_keys and
                getattr(config.get_text_config(), "tie_word_embeddings", False))
    untie = tied and bool({in_name, out_name} & (set(lora) | set(saved)))

    layer_weights = saved_layer_weights(adapters[0]) if adapters else {}
    for name in set(layer_weights) - base_keys:  # a tied head saved beside its embedding: the same matrix
        tied_to = f"{in_name}.weight"
        if not (tied and tied_to in layer_weights and torch.equal(layer_weights[name], layer_weights[tied_to])):
            raise BadInput.one(str(adapters[0].weights_file),
                               f"saves a weight for {name}, which the base does not store",
                               "export with the base the adapter was trained on")
    return _Pass(modules=modules, names=names, lora=lora, saved=saved, prefix=getattr(inner, "base_model_prefix", ""),
                 in_name=in_name, out_name=out_name, untie=untie, layer_weights=layer_weights, rounding=nf4,
                 round_trip_in_merge=merge_base in FOUR_BIT or not adapters,
                 quantized=frozenset(nf4[0]) if nf4 else frozenset())


def _stream_shards(pass_: _Pass, shards: list[Path], headers: list, out_dir: Path, as_trained_dir: Path | None,
                   progress: Progress) -> tuple[list[str], dict[str, str], dict[str, str]]:
    """Each base shard read tensor by tensor, merged and written to its output shard (and, when asked, the
    base as trained to its own shard). Returns (output files, tensor -> file, as-trained tensor -> file)."""
    files = shard_names(len(shards))
    weight_map: dict[str, str] = {}
    trained_map: dict[str, str] = {}
    for i, (shard, entries) in enumerate(zip(shards, headers)):
        progress(f"  merging shard {i + 1}/{len(shards)} ({shard.name}, {shard.stat().st_size / 1e6:.0f} MB)")
        declared = [(f"{m}.{p}", _fp32_code(e.dtype), e.shape) for e in entries for m, p in pass_.outputs(e.name)]
        writer = tensorfile.Writer(out_dir / files[i], declared)
        trained = None
        if as_trained_dir:
            as_trained_dir.mkdir(parents=True, exist_ok=True)
            trained = tensorfile.Writer(as_trained_dir / files[i], [(e.name, _fp32_code(e.dtype), e.shape)
                                                                    for e in entries])
            trained_map.update({e.name: files[i] for e in entries})
        with open(shard, "rb") as f:
            for e in entries:
                _stream_tensor(pass_, f, e, writer, trained)
        writer.close()
        if trained is not None:
            trained.close()
        weight_map.update({name: files[i] for name, _, _ in declared})
    return files, weight_map, trained_map


def _stream_tensor(pass_: _Pass, f, e, writer, trained) -> None:
    """One base tensor: the adapter's saved copy if it has one, the round trip if its module was 4-bit, the as-
    trained copy written, then each output merged and written."""
    import torch

    t = tensorfile.read_tensor(f, e)
    if e.name in pass_.layer_weights:  # the adapter's saved copy of this layer replaces the base's
        t = pass_.layer_weights[e.name]
        pass_.replaced.append(e.name.rpartition(".")[0])
    if t.is_floating_point():
        t = t.to(torch.float32)
    rounded = pass_.rounded(*pass_.outputs(e.name)[-1])  # the base's own module
    if rounded:
        t = round_trip(t, pass_.rounding[1])
    if trained is not None:
        trained.write(e.name, t)  # before the merge, which adds to t in place
    if rounded and not pass_.round_trip_in_merge:
        t = tensorfile.read_tensor(f, e).to(torch.float32)  # merge into the original weight
    for module_name, param in pass_.outputs(e.name):
        out = pass_.merged(module_name, param, t.clone() if module_name == pass_.out_name and pass_.untie else t)
        writer.write(f"{module_name}.{param}", out)
    del t


def _write_index(out_dir: Path, files: list[str], weight_map: dict[str, str]) -> None:
    if len(files) > 1:
        write_index(out_dir, weight_map, {"total_size": sum((out_dir / f).stat().st_size for f in files)})


def _check_merged(pass_: _Pass, where: Path) -> None:
    """Every adapted module found and changed, every merged tensor finite: else one error that lists them."""
    problems = []
    missing = sorted(set(pass_.lora) - set(pass_.deltas))
    if missing:
        problems.append(f"the base checkpoint has no weight for {len(missing)} adapted modules (e.g. {missing[0]})")
    unchanged = sorted(n for n, d in pass_.deltas.items() if d == 0.0)
    if unchanged:
        problems.append(f"merging changed nothing in {len(unchanged)} targeted modules (e.g. {unchanged[0]}): "
                        "their lora_B is zero or their scaling is 0")
    if pass_.bad:
        problems.append(f"the merged weights hold NaN or Inf ({pass_.bad[0]})")
    if problems:
        raise BadInput.one(str(where), "; ".join(problems),
                           "train the adapter (or check its lora_alpha and weights) before exporting it")


def _write_merged_files(base_dir: Path, out_dir: Path, untie: bool) -> None:
    """Config (fp32, no quantization_config, untied if the merge untied), generation config and tokenizer."""
    write_fp32_config(base_dir, out_dir, untie=untie)
    if (base_dir / "generation_config.json").is_file():
        shutil.copy2(base_dir / "generation_config.json", out_dir / "generation_config.json")
    load_tokenizer(base_dir).save_pretrained(str(out_dir))


def _fp32_code(dtype: str) -> str:
    return "F32" if dtype in ("F32", "F16", "BF16", "F64") else dtype


def _write_as_trained_files(base_dir: Path, out: Path, weight_map: dict) -> None:
    """Config (fp32, no quantization_config) and shard index beside the as-trained base's weights."""
    write_fp32_config(base_dir, out)
    if len(set(weight_map.values())) > 1:
        write_index(out, weight_map)
