"""Command line: parse arguments, call one library function, map the outcome to an exit code.

Exit codes: 0 success; 1 the verdict failed (parity or latency budget); 2 bad input or usage, with a
one-paragraph message naming the file, the problem and the fix (a traceback only with --debug).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

EXIT_OK, EXIT_VERDICT, EXIT_BAD_INPUT = 0, 1, 2


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own usage errors also exit 2, with our wording
        self.print_usage(sys.stderr)
        print(f"lora-export: error: {message}. Fix: see `lora-export {self.prog.split()[-1]} --help`.",
              file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)


def _progress():
    start = time.time()

    def say(msg: str) -> None:
        elapsed = int(time.time() - start)
        print(f"[{elapsed // 60}:{elapsed % 60:02d}] {msg}", file=sys.stderr, flush=True)

    return say


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="lora-export", description="QLoRA adapter -> merged ONNX model, with parity and latency proven.")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    d = sub.add_parser("demo", help="the whole pipeline on the embedded default")
    d.add_argument("--out", type=Path, help="output folder (default: a new ./lora-export-demo-N)")

    t = sub.add_parser("train", help="train a QLoRA adapter on a 4-bit NF4 base (or plain LoRA)")
    t.add_argument("--base", type=Path, required=True)
    t.add_argument("--data", type=Path, required=True, help="JSONL: {text}, {prompt, completion} or {messages} records")
    t.add_argument("--out", type=Path, required=True)
    t.add_argument("--rank", type=int, default=8)
    t.add_argument("--alpha", type=float, default=16.0)
    t.add_argument("--dropout", type=float, default=0.0)
    t.add_argument("--target-modules", default="all-linear", help="'all-linear' or comma-separated names")
    t.add_argument("--rslora", action="store_true", help="scale by alpha/sqrt(r) instead of alpha/r")
    t.add_argument("--dora", action="store_true", help="weight-decomposed LoRA")
    t.add_argument("--modules-to-save", default="", help="comma-separated modules trained in full (e.g. lm_head)")
    t.add_argument("--no-quant", action="store_true", help="plain LoRA on the full-precision base")
    t.add_argument("--blocksize", type=int, default=64, help="NF4 block size")
    t.add_argument("--quant-storage", default="uint8", choices=["uint8", "bfloat16", "float16", "float32"],
                   help="storage dtype of the 4-bit weights (bfloat16 for FSDP)")
    t.add_argument("--no-double-quant", action="store_true")
    t.add_argument("--steps", type=int, default=100)
    t.add_argument("--lr", type=float, default=2e-3)
    t.add_argument("--batch-size", type=int, default=8)
    t.add_argument("--max-length", type=int, default=256)
    t.add_argument("--packing", action="store_true", help="concatenate examples into --max-length blocks")
    t.add_argument("--eval-split", type=float, default=0.0, help="share of examples held out for the eval loss")
    t.add_argument("--eval-data", type=Path, help="a separate JSONL for the eval loss")
    t.add_argument("--save-steps", type=int, default=0, help="checkpoint every N steps")
    t.add_argument("--resume", action="store_true", help="continue an interrupted run from its last checkpoint")
    t.add_argument("--seed", type=int, default=0)

    e = sub.add_parser("export", help="merge an adapter and export ONNX for a target, then validate parity")
    e.add_argument("--base", type=Path, required=True)
    e.add_argument("--adapter", type=Path, required=True, action="append",
                   help="a PEFT adapter directory; repeat it to merge several, combined linearly")
    e.add_argument("--adapter-weight", type=float, action="append",
                   help="one weight per --adapter, in order (default 1.0 each)")
    e.add_argument("--target", required=True, help="a shipped target name or a .toml file")
    e.add_argument("--out", type=Path, required=True)
    e.add_argument("--merge-base", choices=["nf4", "original"], help="default: nf4 for QLoRA adapters")
    e.add_argument("--keep-adapter", action="store_true",
                   help="export the unmerged graph: the LoRA as a side path beside each MatMul (plain LoRA/rsLoRA)")
    e.add_argument("--allow-pickle", action="store_true",
                   help="accept a pickle-only adapter_model.bin (read with torch.load(weights_only=True))")

    v = sub.add_parser("validate", help="parity of an export against the adapted model; exit 1 on failure")
    v.add_argument("export_dir", type=Path)
    v.add_argument("--report", type=Path, help="also write the JSON report here")
    v.add_argument("--junit", type=Path, help="also write JUnit XML here")
    v.add_argument("--prompts", type=Path, help="JSONL of prompt (or text) records; default: the embedded eval set")

    b = sub.add_parser("bench", help="latency of the merged export against the base export")
    b.add_argument("export_dir", type=Path)
    b.add_argument("--json", type=Path, help="also write the JSON results here")
    b.add_argument("--plot", type=Path, help="write the PNG plot here (default EXPORT_DIR/bench.png)")
    b.add_argument("--rounds", type=int, default=100, help="interleaved rounds (doubled once if inconclusive)")
    b.add_argument("--eager", action="store_true", help="also time PyTorch eager with the PEFT adapter unmerged")

    g = sub.add_parser("targets", help="list or show deployment targets")
    g.add_argument("action", nargs="?", choices=["list", "show"], default="list")
    g.add_argument("name", nargs="?")
    return p


def _run(args) -> int:
    say = _progress()
    if args.command == "targets":
        from .targets import available, load_target

        if args.action == "show":
            if not args.name:
                from .errors import BadInput

                raise BadInput.one("targets show", "no target named", "run `lora-export targets show NAME`")
            print(Path(load_target(args.name).source).read_text(), end="")
        else:
            for name in available():
                print(f"{name:24s} {load_target(name).description}")
        return EXIT_OK
    if args.command == "train":
        from .base import Nf4Settings
        from .train import TrainConfig, train

        nf4 = Nf4Settings(double_quant=not args.no_double_quant, blocksize=args.blocksize, compute_dtype="auto",
                          quant_storage=args.quant_storage)
        r = train(TrainConfig(
            base=args.base, data=args.data, out=args.out, rank=args.rank, alpha=args.alpha, dropout=args.dropout,
            target_modules=args.target_modules, use_rslora=args.rslora, use_dora=args.dora,
            modules_to_save=tuple(m for m in args.modules_to_save.split(",") if m), quantize=not args.no_quant,
            steps=args.steps, lr=args.lr, batch_size=args.batch_size, max_length=args.max_length,
            packing=args.packing, eval_split=args.eval_split, eval_data=args.eval_data, save_steps=args.save_steps,
            resume=args.resume, seed=args.seed, nf4=nf4), log=say)
        evaluated = f", eval loss {r.eval_loss:.3f}" if r.eval_loss is not None else ""
        print(f"adapter written to {r.adapter_dir} (loss {r.first_loss:.3f} -> {r.final_loss:.3f}{evaluated})")
        return EXIT_OK
    if args.command == "export":
        from .pipeline import ExportRequest, export

        r = export(ExportRequest(base=args.base, adapter=tuple(args.adapter), target=args.target, out=args.out,
                                 adapter_weights=tuple(args.adapter_weight) if args.adapter_weight else None,
                                 merge_base=args.merge_base, allow_pickle=args.allow_pickle,
                                 keep_adapter=args.keep_adapter), progress=say)
        return _verdict(r.parity, f"export written to {r.out} (merge base {r.merge_base})")
    if args.command == "validate":
        from .pipeline import validate

        return _verdict(validate(args.export_dir, args.report, args.junit, args.prompts, progress=say), "")
    if args.command == "bench":
        from .bench import markdown
        from .pipeline import bench

        r = bench(args.export_dir, args.json, progress=say, rounds=args.rounds, plot_path=args.plot, eager=args.eager)
        print(markdown(r))
        return EXIT_OK if r.within_budget else EXIT_VERDICT
    if args.command == "demo":
        from .demo import demo

        return EXIT_OK if demo(args.out, progress=say).passed else EXIT_VERDICT
    raise AssertionError(args.command)


def _verdict(report, headline: str) -> int:
    from .parity import markdown

    print(markdown(report))
    if headline:
        print(headline)
    if report.passed:
        return EXIT_OK
    for c in report.failures:
        print(f"parity FAILED: {c}", file=sys.stderr)
    return EXIT_VERDICT


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is ever downloaded
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from .errors import LoraExportError

    try:
        return _run(args)
    except LoraExportError as e:
        if args.debug:
            raise
        print(f"lora-export: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("lora-export: interrupted; nothing partial was left behind", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
