"""Remake the embedded default: a tiny Llama base pretrained here, its tokenizer, and the demo task.

    python -m lora_export.embedded.remake            # about 3 minutes on 2 CPU cores

Everything is deterministic under the fixed seed and uses text that ships with CPython itself
(``pydoc_data.topics``: the language reference, about 0.5 MB of English prose and code), so it needs no
network. The demo task (label the topic of a sentence) is generated from word lists below; the base
never sees it during pretraining, so the adapter's effect shows as task accuracy before and after.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BASE_DIR = HERE / "base"
DEMO_DIR = HERE / "demo"
SEED = 0

# Model shape: small enough to pretrain in minutes on 2 cores and ship under 10 MB, large enough to be
# a real Llama (GQA with 2 KV heads, RoPE, SwiGLU, tied embeddings). 384 and 128 divide the int4
# block sizes (32) and the NF4 block size (64).
MODEL_SHAPE = dict(
    vocab_size=2048,
    hidden_size=128,
    intermediate_size=384,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    tie_word_embeddings=True,
    rms_norm_eps=1e-5,
)
PRETRAIN = dict(steps=700, batch=16, seq_len=128, lr=3e-3, warmup=50)

TOPICS = {
    "animal": ["cat", "horse", "rabbit", "tiger", "sheep", "eagle", "whale", "mouse", "goat", "fox", "bear", "owl"],
    "food": ["bread", "cheese", "apple", "soup", "rice", "butter", "cake", "honey", "lemon", "pasta", "salad", "onion"],
    "weather": ["rain", "snow", "storm", "fog", "thunder", "wind", "frost", "hail", "drizzle", "sunshine", "cloud", "heat"],
    "music": ["guitar", "violin", "drum", "piano", "flute", "song", "choir", "trumpet", "melody", "cello", "harp", "rhythm"],
}
TEMPLATES = [
    "I thought about the {w} all day.",
    "She pointed at the {w} and smiled.",
    "There was a {w} near the old house.",
    "We talked about the {w} after lunch.",
    "The {w} was the first thing he noticed.",
    "Nobody expected the {w} this morning.",
    "They wrote a short note about the {w}.",
    "My friend keeps mentioning the {w}.",
    "A {w} is all I remember from that trip.",
    "The children asked about the {w} again.",
    "Every picture in the book shows a {w}.",
    "Last night I dreamed of a {w}.",
    "Her letter was mostly about the {w}.",
    "The {w} made the afternoon feel different.",
    "We could hear the {w} from the kitchen.",
    "Grandfather told us a tale about a {w}.",
    "Yesterday the {w} surprised everyone.",
    "He could not stop thinking of the {w}.",
    "In the story, a {w} appears twice.",
]
EVAL_SHARE = 144  # held-out (word, sentence) pairs: each word and each sentence frame is seen in training,
                  # but never together, so the eval measures the learned rule, not memorised lines


def corpus_text() -> str:
    import pydoc_data.topics as topics

    return "\n\n".join(topics.topics[k] for k in sorted(topics.topics))


def make_tokenizer(text: str, out: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=MODEL_SHAPE["vocab_size"],
        special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([text], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.save_pretrained(out)
    return fast


def demo_records(templates: list[str]) -> list[dict]:
    return [
        {"prompt": f"Sentence: {t.format(w=w)}\nTopic:", "completion": f" {label}"}
        for label, words in TOPICS.items()
        for w in words
        for t in templates
    ]


def write_demo() -> None:
    rows = demo_records(TEMPLATES)
    random.Random(SEED).shuffle(rows)
    DEMO_DIR.mkdir(exist_ok=True)
    for name, part in (("eval", rows[:EVAL_SHARE]), ("train", rows[EVAL_SHARE:])):
        (DEMO_DIR / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))


def pretrain(out: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(SEED)
    text = corpus_text()
    tok = make_tokenizer(text, out)
    ids = torch.tensor(tok(text)["input_ids"], dtype=torch.long)
    cfg = LlamaConfig(
        **MODEL_SHAPE, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
    )
    model = LlamaForCausalLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=PRETRAIN["lr"], weight_decay=0.01)
    steps, batch, seq = PRETRAIN["steps"], PRETRAIN["batch"], PRETRAIN["seq_len"]
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / PRETRAIN["warmup"]) * max(0.05, 1 - s / steps)
    )
    gen = torch.Generator().manual_seed(SEED)
    start = time.time()
    for step in range(steps):
        starts = torch.randint(0, len(ids) - seq - 1, (batch,), generator=gen)
        x = torch.stack([ids[s : s + seq] for s in starts])
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
        if step % 50 == 0 or step == steps - 1:
            print(f"step {step:4d}  loss {loss.item():.3f}  {time.time() - start:.0f}s", flush=True)
    model.save_pretrained(out)
    print(f"{len(ids)} tokens of text, {sum(p.numel() for p in model.parameters())} parameters")


def main() -> None:
    tmp = BASE_DIR.with_name("base.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    pretrain(tmp)
    shutil.rmtree(BASE_DIR, ignore_errors=True)
    tmp.rename(BASE_DIR)
    write_demo()
    size = sum(f.stat().st_size for f in HERE.rglob("*") if f.is_file())
    print(f"embedded default written to {HERE} ({size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
