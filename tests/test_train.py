"""QLoRA training on a 4-bit NF4 base: the loss goes down, the adapter is plain PEFT, the manifest is complete."""

import json

import pytest
import torch

from lora_export.errors import BadInput
from lora_export.manifests import TRAINING_MANIFEST as MANIFEST
from lora_export.train import TrainConfig, train

from .conftest import EMBEDDED


def test_adapter_is_peft_and_manifest_is_complete(tiny_adapter, tiny_base):
    assert (tiny_adapter / "adapter_config.json").is_file()
    assert (tiny_adapter / "adapter_model.safetensors").is_file()
    assert not list(tiny_adapter.glob("*.bin"))
    m = json.loads((tiny_adapter / MANIFEST).read_text())
    assert m["kind"] == "qlora"
    assert m["quantization"]["quant_type"] == "nf4" and m["quantization"]["double_quant"] is True
    assert len(m["quantization"]["quantized_modules"]) == 14  # 7 linear layers x 2 blocks; lm_head stays
    assert m["base"]["weights_sha256"]["model.safetensors"]
    assert m["data"]["examples"] > 0 and len(m["data"]["sha256"]) == 64
    assert m["training"]["final_loss"] < m["training"]["first_loss"]


def test_trained_adapter_loads_in_plain_peft_on_the_4bit_base(tiny_adapter, tiny_base):
    from peft import PeftModel

    from lora_export.base import Nf4Settings, load_nf4

    model = PeftModel.from_pretrained(load_nf4(tiny_base, Nf4Settings()), str(tiny_adapter))
    b = [m for n, m in model.named_modules() if n.endswith("q_proj.lora_B.default")][0]
    assert b.weight.abs().max() > 0  # trained, not the zero initialisation


def test_bad_inputs_write_nothing(tiny_base, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(BadInput) as e:
        train(TrainConfig(base=tiny_base, data=EMBEDDED / "demo" / "train.jsonl", out=out, rank=0, steps=0))
    assert len(e.value.problems) == 2
    with pytest.raises(BadInput, match="match no linear layer"):
        train(TrainConfig(base=tiny_base, data=EMBEDDED / "demo" / "train.jsonl", out=out,
                          target_modules="q_proj,not_a_layer", steps=1))
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == []


@pytest.mark.slow
def test_training_is_deterministic_under_a_seed(tiny_base, tmp_path):
    from safetensors.torch import load_file

    outs = []
    for i in range(2):
        out = tmp_path / f"a{i}"
        train(TrainConfig(base=tiny_base, data=EMBEDDED / "demo" / "train.jsonl", out=out, steps=5, seed=3))
        outs.append(load_file(str(out / "adapter_model.safetensors")))
    assert outs[0].keys() == outs[1].keys()
    assert all(torch.equal(outs[0][k], outs[1][k]) for k in outs[0])


DATA = EMBEDDED / "demo" / "train.jsonl"


def _logits(model, ids=((0, 11, 52, 301, 7, 99, 1500, 42),)):
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids)).logits.float()


def test_saved_adapter_reproduces_the_in_memory_model(tiny_base, tmp_path):
    """Plain PEFT on the same 4-bit base gives the trainer's logits (max |diff| <= 1e-5, fp32)."""
    from peft import PeftModel

    from lora_export.base import Nf4Settings, load_nf4

    r = train(TrainConfig(base=tiny_base, data=DATA, out=tmp_path / "a", steps=5))
    r.model.eval()
    loaded = PeftModel.from_pretrained(load_nf4(tiny_base, Nf4Settings()), str(r.adapter_dir)).eval()
    diff = (_logits(r.model) - _logits(loaded)).abs().max().item()
    assert diff <= 1e-5, diff


class Interrupt(Exception):
    pass


@pytest.mark.slow
def test_resume_reaches_the_same_weights_as_an_uninterrupted_run(tiny_base, tmp_path):
    from safetensors.torch import load_file
    from transformers import TrainerCallback

    from lora_export.train import checkpoint_dir

    class StopAt(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 6:
                raise Interrupt

    cfg = dict(base=tiny_base, data=DATA, steps=10, save_steps=4, seed=1)
    whole = train(TrainConfig(out=tmp_path / "whole", **cfg))
    with pytest.raises(Interrupt):
        train(TrainConfig(out=tmp_path / "cut", **cfg), callbacks=[StopAt()])
    assert not (tmp_path / "cut").exists()  # nothing half-written where the adapter goes
    assert (checkpoint_dir(tmp_path / "cut") / "checkpoint-4").is_dir()
    resumed = train(TrainConfig(out=tmp_path / "cut", resume=True, **cfg))
    a = load_file(str(whole.adapter_dir / "adapter_model.safetensors"))
    b = load_file(str(resumed.adapter_dir / "adapter_model.safetensors"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    assert not checkpoint_dir(tmp_path / "cut").exists()  # cleaned up once the adapter is complete
    assert json.loads((resumed.adapter_dir / MANIFEST).read_text())["training"]["resumed"] is True


@pytest.mark.parametrize("records", [
    ['{"text": "The cat sat on the mat."}', '{"text": "Rain fell all day."}'],
    ['{"prompt": "Sentence: a cat.\\nTopic:", "completion": " animal"}', '{"prompt": "Q:", "completion": " A"}'],
    ['{"messages": [{"role": "user", "content": "a cat?"}, {"role": "assistant", "content": "animal"}]}',
     '{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "rain?"}, '
     '{"role": "assistant", "content": "weather"}]}'],
])
def test_each_data_shape_trains(records, tiny_base, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(records * 4) + "\n")
    r = train(TrainConfig(base=tiny_base, data=data, out=tmp_path / "a", steps=3, batch_size=4, eval_split=0.25))
    m = json.loads((r.adapter_dir / MANIFEST).read_text())
    assert m["data"]["train_examples"] == 6 and m["data"]["eval_examples"] == 2
    assert r.eval_loss is not None and m["training"]["eval_loss"] == r.eval_loss


def test_messages_use_the_chat_template_when_there_is_one(tiny_base):
    from lora_export.base import load_tokenizer
    from lora_export.data import Example, to_prompt_completion

    tok = load_tokenizer(tiny_base)
    ex = Example("", "", (("user", "a cat?"), ("assistant", "animal")))
    assert to_prompt_completion(ex, tok) == ("user: a cat?\nassistant:", " animal")  # no template: plain lines
    tok.chat_template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}" \
                        "{% if add_generation_prompt %}<assistant>{% endif %}"
    assert to_prompt_completion(ex, tok) == ("<user>a cat?<assistant>", "animal")


def test_packing_fills_blocks(tiny_base, tmp_path):
    r = train(TrainConfig(base=tiny_base, data=DATA, out=tmp_path / "a", steps=2, packing=True, max_length=64))
    m = json.loads((r.adapter_dir / MANIFEST).read_text())
    assert m["data"]["packing"] is True and m["data"]["sequences"] < m["data"]["train_examples"]


def test_plain_lora_mode_merges_into_the_original_base(tiny_base, tmp_path):
    from lora_export.adapters import load_adapter
    from lora_export.merge import default_merge_base

    r = train(TrainConfig(base=tiny_base, data=DATA, out=tmp_path / "a", steps=3, quantize=False))
    m = json.loads((r.adapter_dir / MANIFEST).read_text())
    assert m["kind"] == "lora" and m["quantization"] is None
    assert default_merge_base(load_adapter(r.adapter_dir, tiny_base)) == "original"


@pytest.mark.parametrize("variant", [dict(use_rslora=True), dict(use_dora=True), dict(nf4_blocksize=128)])
def test_variants_merge_back_to_the_trained_model(variant, tiny_base, tmp_path):
    """rsLoRA, DoRA and a non-default NF4 block size survive the trip: nf4 merge == trained (<= 1e-4)."""
    from lora_export.adapters import load_adapter
    from lora_export.base import Nf4Settings, load_fp32
    from lora_export.merge import merge
    from lora_export.reference import load_adapted

    blocksize = variant.pop("nf4_blocksize", 64)
    r = train(TrainConfig(base=tiny_base, data=DATA, out=tmp_path / "a", steps=4, lr=1e-2,
                          nf4=Nf4Settings(blocksize=blocksize, compute_dtype="auto"), **variant))
    adapter = load_adapter(r.adapter_dir, tiny_base)
    assert adapter.manifest.quantization.settings.blocksize == blocksize
    trained = _logits(load_adapted(tiny_base, adapter))
    assert (trained - _logits(load_fp32(tiny_base))).abs().max() > 1e-3  # the adapter does something
    merged = load_fp32(merge(tiny_base, adapter, tmp_path / "m", "nf4").checkpoint)
    diff = (_logits(merged) - trained).abs().max().item()
    assert diff <= 1e-4, diff


@pytest.mark.parametrize("overrides, fragment", [
    (dict(resume=True), "no checkpoint to resume from"),
    (dict(eval_split=1.5), "eval split must lie in [0, 1)"),
    (dict(target_modules="nothing_here"), "match no linear layer"),
    (dict(nf4=None), "block size 100 is not supported"),
])
def test_more_bad_inputs(overrides, fragment, tiny_base, tmp_path):
    from lora_export.base import Nf4Settings

    if "nf4" in overrides:
        overrides["nf4"] = Nf4Settings(blocksize=100)
    with pytest.raises(BadInput) as e:
        train(TrainConfig(base=tiny_base, data=DATA, out=tmp_path / "a", steps=2, **overrides))
    assert fragment in str(e.value)
    assert list(tmp_path.iterdir()) == []


def test_bad_chat_record_names_its_line(tmp_path):
    from lora_export.data import load_jsonl

    f = tmp_path / "chat.jsonl"
    f.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'
                 '{"messages": [{"role": "user", "content": "no answer"}]}\n')
    with pytest.raises(BadInput) as e:
        load_jsonl(f)
    assert e.value.problems[0].where == f"{f}:2" and "assistant" in e.value.problems[0].what


@pytest.mark.slow
def test_gradient_checkpointing_is_on_by_default_and_changes_no_number(tiny_base, tmp_path):
    """Checkpointing recomputes each layer's forward in the backward pass: same weights as without it (dropout
    included: non-reentrant checkpointing restores the RNG state), recorded in the manifest."""
    from safetensors.torch import load_file

    cfg = dict(base=tiny_base, data=DATA, steps=4, dropout=0.1, seed=2)
    on = train(TrainConfig(out=tmp_path / "on", **cfg))
    off = train(TrainConfig(out=tmp_path / "off", gradient_checkpointing=False, **cfg))
    assert on.model.get_base_model().is_activation_checkpointing
    assert not off.model.get_base_model().is_activation_checkpointing
    assert on.final_loss < on.first_loss
    a, b = (load_file(str(r.adapter_dir / "adapter_model.safetensors")) for r in (on, off))
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    ma, mb = (json.loads((r.adapter_dir / MANIFEST).read_text())["training"] for r in (on, off))
    assert (ma["gradient_checkpointing"], mb["gradient_checkpointing"]) == (True, False)
    assert ma["optimizer"] == mb["optimizer"] == "adamw_torch"


def test_plain_lora_trains_with_gradient_checkpointing(tiny_base, tmp_path):
    r = train(TrainConfig(base=tiny_base, data=DATA, out=tmp_path / "a", steps=4, quantize=False))
    assert r.model.get_base_model().is_activation_checkpointing and r.final_loss < r.first_loss


@pytest.mark.slow
def test_paged_optimizer_runs_on_the_cpu_unpaged(tmp_path):
    """bitsandbytes 0.50 runs its paged optimizers on the CPU without paging (it warns and falls back): accepted,
    said in the log, recorded in the manifest. The stepping is bitsandbytes' own, with 8-bit state (a base 512 wide:
    bitsandbytes keeps tensors under 4096 elements in 32 bits), and an interrupted run resumes bit-identically."""
    from safetensors.torch import load_file
    from transformers import TrainerCallback

    from .conftest import make_base

    base = make_base(tmp_path / "base", hidden_size=512, intermediate_size=1024, num_attention_heads=8,
                     num_key_value_heads=4)
    seen, lines = set(), []

    class Optimizer(TrainerCallback):
        def on_step_end(self, args, state, control, optimizer=None, **kw):
            inner = getattr(optimizer, "optimizer", optimizer)
            seen.add(type(inner).__module__.split(".")[0])
            seen.update(str(v.dtype) for st in inner.state.values() for k, v in st.items() if k == "state1")

    class StopAt6(Optimizer):
        def on_step_end(self, args, state, control, **kw):
            super().on_step_end(args, state, control, **kw)
            if state.global_step == 6:
                raise Interrupt

    cfg = dict(base=base, data=DATA, steps=10, save_steps=4, batch_size=4, optim="paged_adamw_8bit")
    whole = train(TrainConfig(out=tmp_path / "whole", **cfg), log=lines.append, callbacks=[Optimizer()])
    assert {"bitsandbytes", "torch.uint8"} <= seen and not seen & {"torch"}, seen
    assert whole.final_loss < whole.first_loss
    m = json.loads((whole.adapter_dir / MANIFEST).read_text())["training"]
    assert m["optimizer"] == "paged_adamw_8bit" and m["device"] == "cpu"
    if not torch.cuda.is_available():
        assert any("pages optimizer state only on a CUDA GPU" in line for line in lines)
    with pytest.raises(Interrupt):
        train(TrainConfig(out=tmp_path / "cut", **cfg), log=lambda m: None, callbacks=[StopAt6()])
    resumed = train(TrainConfig(out=tmp_path / "cut", resume=True, **cfg), log=lambda m: None)
    a = load_file(str(whole.adapter_dir / "adapter_model.safetensors"))
    b = load_file(str(resumed.adapter_dir / "adapter_model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_optimizer_choices_match_the_cli_and_a_bad_one_is_refused(tiny_base, tmp_path):
    from lora_export.cli import build_parser
    from lora_export.train import OPTIMIZERS

    train_parser = build_parser()._subparsers._group_actions[0].choices["train"]
    optim = next(a for a in train_parser._actions if "--optim" in a.option_strings)
    assert tuple(optim.choices) == OPTIMIZERS and optim.default == "adamw_torch"
    with pytest.raises(BadInput, match="--optim: optimizer 'sgd' is not offered"):
        train(TrainConfig(base=tiny_base, data=DATA, out=tmp_path / "a", steps=2, optim="sgd"))
    assert list(tmp_path.iterdir()) == []


def test_resume_skips_a_checkpoint_a_kill_left_half_written(tmp_path):
    """The Trainer writes trainer_state.json last; a folder without it is not resumed from."""
    from lora_export.train import _last_checkpoint, checkpoint_dir

    d = checkpoint_dir(tmp_path / "a")
    (d / "checkpoint-4").mkdir(parents=True)
    (d / "checkpoint-4" / "trainer_state.json").write_text("{}")
    (d / "checkpoint-12").mkdir()  # killed while saving: weights maybe, no trainer state
    (d / "checkpoint-12" / "adapter_model.safetensors").write_bytes(b"")
    (d / "checkpoint-8").mkdir()
    (d / "checkpoint-8" / "trainer_state.json").write_text("{}")
    assert _last_checkpoint(tmp_path / "a") == str(d / "checkpoint-8")
    assert _last_checkpoint(tmp_path / "b") is None
