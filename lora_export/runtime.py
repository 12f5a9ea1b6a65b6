"""Step-wise causal LMs behind one interface: an exported ONNX model in ONNX Runtime, or a PyTorch model.

Both take ``(input_ids, attention_mask, past)`` and return ``(logits, past)``, so parity, task accuracy
and the latency benchmark drive them with the same greedy loop, and the ONNX model really reads its
KV cache on every decode step.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import BadInput, ToolchainFailed, UnreadableModel
from .export.io_spec import (
    check_external_data,
    check_io,
    kv_input_names,
    kv_output_names,
)


def import_onnxruntime():
    try:
        import onnxruntime
    except ImportError as e:
        raise ToolchainFailed('ONNX Runtime is not installed. Fix: pip install "lora-export[cpu]" (or '
                              '"lora-export[gpu]" for CUDA), not both') from e
    return onnxruntime


def omp_threads() -> int:
    """OMP_NUM_THREADS as a positive int, else 0 (ONNX Runtime's default: one thread per physical core)."""
    value = os.environ.get("OMP_NUM_THREADS", "").strip()
    return int(value) if value.isdigit() and int(value) > 0 else 0


def check_providers(providers, path: Path) -> None:
    """Refuse, before any work, execution providers this ONNX Runtime does not have."""
    ort = import_onnxruntime()
    providers = [providers] if isinstance(providers, str) else list(providers)
    missing = [p for p in providers if p not in ort.get_available_providers()]
    if missing:
        raise BadInput.one(str(path), f"{', '.join(missing)} not available in this ONNX Runtime "
                           f"(it has {', '.join(ort.get_available_providers())})",
                           'for CUDA install "lora-export[gpu]" in a fresh environment; else use a CPU target')


DEVICE_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")


def parity_providers(providers) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(the providers parity runs with here, the target's device providers this ONNX Runtime lacks).

    A CUDA or TensorRT target exported on a machine without them is still checked: the graph runs on the CPU
    provider (which has kernels for the fused graph in fp16 and for MatMulNBits), with the target's thresholds,
    and the missing providers are named so that `lora-export validate` on the GPU machine completes the check.
    A provider that is neither available nor a device provider is refused as before."""
    ort = import_onnxruntime()
    available = ort.get_available_providers()
    providers = [providers] if isinstance(providers, str) else list(providers)
    missing = tuple(p for p in providers if p not in available)
    if not missing:
        return tuple(providers), ()
    if all(p in DEVICE_PROVIDERS for p in missing):
        usable = tuple(p for p in providers if p in available)
        return (usable if any(p in DEVICE_PROVIDERS for p in usable) else ("CPUExecutionProvider",)), missing
    return tuple(providers), missing  # check_providers refuses these


def run_options_for(ort, path: Path):
    """(RunOptions with the adapter file ``path`` active, the loaded adapter: ONNX Runtime memory-maps it)."""
    if not path.is_file():
        raise BadInput.one(str(path), "no adapter file here", "pass a file under EXPORT_DIR/adapters/")
    adapter = ort.LoraAdapter()
    try:
        adapter.Load(str(path))
    except Exception as e:
        raise BadInput.one(str(path), f"ONNX Runtime cannot read this adapter file ({str(e)[:200]})",
                           "re-export it with `lora-export export --switchable` or `--into`") from e
    options = ort.RunOptions()
    options.add_active_adapter(adapter)
    return options, adapter  # the caller keeps the adapter alive as long as the options


class OrtCausalLM:
    """An exported decoder in a plain ``onnxruntime.InferenceSession`` with its KV cache."""

    # GroupQueryAttention (the fused graph) reads each row's length from the sum of its attention mask and
    # appends new keys right after it: right padding. A graph of plain attention takes left padding.
    padding_side = "right"

    def __init__(self, export_dir: str | Path, providers=("CPUExecutionProvider",), threads: int = 0,
                 io_binding: bool = False, adapter: str | Path | None = None):
        """``io_binding``: keep the KV cache in ONNX Runtime's own buffers (on the device, for CUDA) between
        steps instead of copying it out to numpy and back in on every step. ``adapter``: an ``.onnx_adapter``
        file (a switchable export's) made active on every run; none: the graph's own LoRA defaults."""
        ort = import_onnxruntime()
        self._ort = ort
        self.run_options = None
        if adapter is not None:  # --switchable: ONNX Runtime binds the file's parameters to the LoRA inputs
            self.run_options, self._adapter = run_options_for(ort, Path(adapter))

        self.dir = Path(export_dir)
        path = self.dir / "model.onnx"
        if not path.is_file():
            raise BadInput.one(str(path), "no ONNX model here", "pass a directory written by `lora-export export`")
        graph = check_external_data(path).graph
        self.padding_side = "right" if any(n.op_type == "GroupQueryAttention" for n in graph.node) else "left"
        del graph
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        # OMP_NUM_THREADS, which PyTorch already obeys, caps ONNX Runtime's pool too: one knob for a shared runner
        # (two ORT pools spinning on the same cores run slower than one after the other: measured in .ci/run)
        threads = threads or omp_threads()
        if threads:
            opts.intra_op_num_threads = threads
        providers = [providers] if isinstance(providers, str) else list(providers)
        check_providers(providers, path)
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=providers)
        except Exception as e:  # ORT raises its own exception types; name the file and stop
            raise UnreadableModel.one(str(path), f"ONNX Runtime cannot load this model ({str(e)[:300]})",
                               "re-export it with `lora-export export`") from e
        inputs = {i.name: i for i in self.session.get_inputs()}
        self.input_names = set(inputs)
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.num_layers = sum(1 for n in inputs if n.startswith("past_key_values.") and n.endswith(".key"))
        check_io(self.input_names, set(self.output_names), max(self.num_layers, 1), str(path))
        key0 = inputs["past_key_values.0.key"]
        self.kv_heads, self.head_dim = int(key0.shape[1]), self._head_dim(key0)
        self.kv_dtype = np.float16 if "float16" in key0.type else np.float32
        self._kv_in = kv_input_names(self.num_layers)
        self._kv_out = kv_output_names(self.num_layers)
        self.io_binding = io_binding
        self._device = "cuda" if self.session.get_providers()[0] in ("CUDAExecutionProvider",
                                                                    "TensorrtExecutionProvider") else "cpu"

    @property
    def context_length(self) -> int | None:
        cfg = self.dir / "genai_config.json"
        return json.loads(cfg.read_text())["model"].get("context_length") if cfg.is_file() else None

    def _head_dim(self, key_input) -> int:
        dim = key_input.shape[3]
        if isinstance(dim, int):
            return dim
        cfg = json.loads((self.dir / "genai_config.json").read_text())["model"]["decoder"]
        return int(cfg["head_size"])

    def empty_past(self, batch: int) -> list[np.ndarray]:
        shape = (batch, self.kv_heads, 0, self.head_dim)
        return [np.zeros(shape, self.kv_dtype) for _ in self._kv_in]

    def step(self, input_ids: np.ndarray, attention_mask: np.ndarray, past):
        if past is None:
            past = self.empty_past(input_ids.shape[0])
        feed = {"input_ids": input_ids.astype(np.int64), "attention_mask": attention_mask.astype(np.int64)}
        if "position_ids" in self.input_names:
            pos = np.cumsum(attention_mask, axis=1) - 1
            feed["position_ids"] = np.maximum(pos, 0)[:, -input_ids.shape[1]:].astype(np.int64)
        if self.io_binding:
            return self._step_bound(feed, past)
        feed.update(zip(self._kv_in, past))
        outs = dict(zip(self.output_names, self.session.run(None, feed, self.run_options)))
        return outs["logits"].astype(np.float32), [outs[n] for n in self._kv_out]

    def _step_bound(self, feed: dict, past):
        """One step through IO binding; the past comes back as OrtValues that stay where ORT put them.

        The present buffers are allocated here, owned by Python, and bound as outputs: values ORT allocates
        itself for a binding's outputs do not outlive the binding reliably (measured: stale keys)."""
        ort = self._ort
        io = self.session.io_binding()
        for name, value in list(feed.items()) + list(zip(self._kv_in, past)):
            io.bind_ortvalue_input(name, value if isinstance(value, ort.OrtValue) else
                                   ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(value), self._device, 0))
        batch, seq = feed["input_ids"].shape
        past_len = past[0].shape()[2] if isinstance(past[0], ort.OrtValue) else past[0].shape[2]
        present = [ort.OrtValue.ortvalue_from_shape_and_type((batch, self.kv_heads, past_len + seq, self.head_dim),
                                                             self.kv_dtype, self._device, 0) for _ in self._kv_out]
        io.bind_output("logits", "cpu")
        for name, value in zip(self._kv_out, present):
            io.bind_ortvalue_output(name, value)
        self.session.run_with_iobinding(io, self.run_options)
        logits = io.get_outputs()[0].numpy()  # outputs come back in binding order
        return logits.astype(np.float32), present


class TorchCausalLM:
    """A transformers causal LM (plain, 4-bit, or with a PEFT adapter) behind the same step interface."""

    padding_side = "left"
    rows_per_pass = 0  # a layerwise model (reads its weights at each forward) takes at least this many rows a pass

    def __init__(self, model):
        import inspect

        self.model = model.eval()
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model
        params = inspect.signature(inner.forward).parameters
        # transformers 5.x renames past_key_values to cache; use whichever this version's forward takes
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._keep_kw = "logits_to_keep" in params

    def step(self, input_ids: np.ndarray, attention_mask: np.ndarray, past, last_only: bool = False,
             use_cache: bool = True):
        """``last_only``: logits of the last column only (greedy decoding needs no more)."""
        import torch

        mask = torch.from_numpy(attention_mask.astype(np.int64))
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -input_ids.shape[1]:]  # left padding shifts positions
        extra = {"logits_to_keep": 1} if last_only and self._keep_kw else {}
        with torch.no_grad():
            out = self.model(
                input_ids=torch.from_numpy(input_ids.astype(np.int64)),
                attention_mask=mask,
                position_ids=positions,
                use_cache=use_cache,
                **({self._cache_kw: past} if use_cache else {}),
                **extra,
            )
        logits = out.logits[:, -1:] if last_only else out.logits
        cache = (out.cache if self._cache_kw == "cache" else out.past_key_values) if use_cache else None
        return logits.float().numpy(), cache


@dataclass(frozen=True)
class Generation:
    tokens: list[int]  # the generated tokens (greedy, or the forced ones)
    logits: np.ndarray  # (prompt_len + steps - 1, vocab): every real prompt position, then each decode step


def _mask(lengths: np.ndarray, width: int, side: str) -> np.ndarray:
    cols = np.arange(width)[None]
    keep = cols < lengths[:, None] if side == "right" else cols >= (width - lengths)[:, None]
    return keep.astype(np.int64)


def generate(model, prompts: list[list[int]], steps: int, forced: list[list[int]] | None = None,
             pad_id: int = 0) -> list[Generation]:
    """Greedy decoding of a batch: one prompt pass, then ``steps - 1`` decode steps through the KV cache.

    Prompts of different lengths are padded on the side the model expects (``model.padding_side``):
    PyTorch models take the usual left padding; the fused ONNX graph takes right padding, since its
    GroupQueryAttention reads each row's length from the attention mask's sum and appends new keys right
    after it. Each row's logits are returned for its real tokens only, so models that pad differently
    compare position by position. With ``forced``, the given tokens are fed instead of each model's own
    choices (teacher forcing).
    """
    side = getattr(model, "padding_side", "left")
    lengths = np.array([len(p) for p in prompts])
    width = int(lengths.max())
    mask = _mask(lengths, width, side)
    ids = np.full((len(prompts), width), pad_id, dtype=np.int64)
    ids[mask.astype(bool)] = np.concatenate(prompts)
    logits, past = model.step(ids, mask, None)
    rows = [[logits[b][mask[b].astype(bool)]] for b in range(len(prompts))]
    tokens: list[list[int]] = [[] for _ in prompts]
    for i in range(steps):
        nxt = [int(np.argmax(r[-1][-1])) if forced is None else forced[b][i] for b, r in enumerate(rows)]
        for b, t in enumerate(nxt):
            tokens[b].append(t)
        if i == steps - 1:
            break
        lengths = lengths + 1
        mask = _mask(lengths, mask.shape[1] + 1, side)
        logits, past = model.step(np.array(nxt, dtype=np.int64)[:, None], mask, past)
        for b, r in enumerate(rows):
            r.append(logits[b])
    return [Generation(tokens=t, logits=np.concatenate(r, axis=0)) for t, r in zip(tokens, rows)]


def greedy(model, prompt: list[int], steps: int, forced: list[int] | None = None) -> Generation:
    """Greedy decoding of one prompt (batch 1); see ``generate``."""
    return generate(model, [prompt], steps, None if forced is None else [forced])[0]


def greedy_tokens(model: TorchCausalLM, prompts: list[list[int]], steps: int) -> list[list[int]]:
    """Greedy continuations of a left-padded batch of prompts through the KV cache, keeping no logits
    but the last position's: the whole batch in one go at the cost of a few rows of logits."""
    lengths = np.array([len(p) for p in prompts])
    mask = _mask(lengths, int(lengths.max()), "left")
    ids = np.zeros(mask.shape, dtype=np.int64)
    ids[mask.astype(bool)] = np.concatenate(prompts)
    logits, past = model.step(ids, mask, None, last_only=True)
    tokens: list[list[int]] = [[] for _ in prompts]
    for i in range(steps):
        nxt = logits[:, -1].argmax(-1)
        for b, t in enumerate(nxt.tolist()):
            tokens[b].append(int(t))
        if i == steps - 1:
            break
        mask = np.concatenate([mask, np.ones((len(prompts), 1), np.int64)], axis=1)
        logits, past = model.step(nxt.astype(np.int64)[:, None], mask, past, last_only=True)
    return tokens


def teacher_forced(model: TorchCausalLM, sequences: list[list[int]], budget_rows: int):
    """Yield (index, logits of every position) for each whole sequence, from one forward pass per batch
    (no KV cache); batches are formed so that batch x width stays within ``budget_rows`` logit rows (or the model's
    ``rows_per_pass``, when larger: a layerwise model reads all its weights again for every batch)."""
    budget_rows = max(budget_rows, getattr(model, "rows_per_pass", 0))
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    batch: list[int] = []
    for i in order + [None]:
        if i is not None and (not batch or (len(batch) + 1) * len(sequences[i]) <= budget_rows):
            batch.append(i)
            continue
        if not batch:
            return
        lengths = np.array([len(sequences[j]) for j in batch])
        mask = _mask(lengths, int(lengths.max()), "left")
        ids = np.zeros(mask.shape, dtype=np.int64)
        ids[mask.astype(bool)] = np.concatenate([sequences[j] for j in batch])
        logits, _ = model.step(ids, mask, None, use_cache=False)
        for b, j in enumerate(batch):
            yield j, logits[b][mask[b].astype(bool)]
        del logits
        batch = [i]


class LogitStore:
    """Logit rows per sequence in a file (float32), read back one sequence at a time: a written file sits
    in the page cache, not in the process's memory, so parity holds only one model's logits in RAM.
    Another process reads it through ``reader(state())``; whoever made the path removes the file."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._file = None
        self._index: dict[int, tuple[int, tuple[int, ...]]] = {}

    def put(self, key: int, rows: np.ndarray) -> None:
        if self._file is None:
            self._file = open(self.path, "w+b")
        rows = np.ascontiguousarray(rows, dtype=np.float32)
        self._file.seek(0, 2)
        self._index[key] = (self._file.tell(), rows.shape)
        rows.tofile(self._file)

    def __getitem__(self, key: int) -> np.ndarray:
        offset, shape = self._index[key]
        self._file.seek(offset)
        return np.fromfile(self._file, dtype=np.float32, count=int(np.prod(shape))).reshape(shape)

    def state(self) -> tuple:
        """What another process needs to read this store: the file and the index."""
        if self._file is not None:
            self._file.flush()
        return str(self.path), dict(self._index)

    @classmethod
    def reader(cls, state: tuple) -> "LogitStore":
        store = cls(Path(state[0]))
        store._index = dict(state[1])
        if store._index:
            store._file = open(store.path, "rb")
        return store

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def release() -> None:
    """Return freed memory to the system after a model is dropped (glibc keeps freed heap otherwise)."""
    import gc

    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
