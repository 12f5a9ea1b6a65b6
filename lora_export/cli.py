"""Command line: parse arguments, call one library function, map the outcome to an exit code.

Exit codes: 0 success; 1 the verdict failed (parity or latency budget); 2 bad input or usage, with a
one-paragraph message naming the file, the problem and the fix; 3 the toolchain failed (the graph builder,
the ONNX exporter, ONNX Runtime, a stage's process), with the log's path. A traceback only with --debug.

The terminal gets one line per stage and the result; everything the libraries print goes to a log file
(``export.log``, ``train.log``, ... in the output directory), shown live with ``-v``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import tempfile
import traceback
from pathlib import Path

EXIT_OK, EXIT_VERDICT, EXIT_BAD_INPUT, EXIT_TOOLCHAIN = 0, 1, 2, 3


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own usage errors also exit 2, with our wording
        self.print_usage(sys.stderr)
        print(f"{self.prog}: error: {message}. Fix: see `{self.prog} --help`.", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)


class _Help(argparse.HelpFormatter):
    """Every option's help ends with its default, where it has one worth showing."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if (action.option_strings and default is not None and default is not False and default is not argparse.SUPPRESS
                and "%(default)" not in text
                and not isinstance(action, (argparse._StoreTrueAction, argparse._HelpAction, argparse._VersionAction))):
            text += " (default: %(default)s)"
        return text


class _Versions(argparse.Action):
    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        from .versions import package_versions

        found = package_versions()
        print(f"lora-export {found.pop('lora-export', '?')}")
        for name, version in found.items():
            print(f"  {name} {version}")
        parser.exit()


def _common() -> argparse.ArgumentParser:
    """-v and --debug, accepted before or after the command (after it, they do not reset what came before)."""
    c = argparse.ArgumentParser(add_help=False)
    c.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                   help="show every library's output live (it always goes to the command's log file)")
    c.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                   help="on an error, also print the Python traceback")
    return c


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="lora-export", formatter_class=_Help,
                description="QLoRA adapter -> merged ONNX model, with parity and latency proven. Exit codes: 0 "
                            "success, 1 the verdict failed (parity or latency budget), 2 bad input, 3 the "
                            "toolchain failed (see the log).")
    p.add_argument("--version", action=_Versions, help="print the version and those of the packages it drives")
    p.add_argument("-v", "--verbose", action="store_true", help="show every library's output live")
    p.add_argument("--debug", action="store_true", help="on an error, also print the Python traceback")
    common = [_common()]
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser, metavar="COMMAND")

    def command(name, help):
        return sub.add_parser(name, help=help, description=help, parents=common, formatter_class=_Help)

    d = command("demo", "the whole pipeline on the embedded default: train, export, validate, bench")
    d.add_argument("--out", type=Path, help="output folder (default: a new ./lora-export-demo-N)")

    t = command("train", "train a QLoRA adapter on a 4-bit NF4 base (or plain LoRA)")
    t.add_argument("--base", type=Path, required=True, help="base model directory (config.json, safetensors, tokenizer)")
    t.add_argument("--data", type=Path, required=True, help="JSONL: {text}, {prompt, completion} or {messages} records")
    t.add_argument("--out", type=Path, required=True, help="adapter directory to create (must not exist or be empty)")
    t.add_argument("--rank", type=int, default=8, help="LoRA rank r")
    t.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha (the update is scaled by alpha/r)")
    t.add_argument("--dropout", type=float, default=0.0, help="LoRA dropout probability, in [0, 1)")
    t.add_argument("--target-modules", default="all-linear", help="'all-linear' or comma-separated module names")
    t.add_argument("--rslora", action="store_true", help="scale by alpha/sqrt(r) instead of alpha/r")
    t.add_argument("--dora", action="store_true", help="weight-decomposed LoRA")
    t.add_argument("--modules-to-save", default="", help="comma-separated modules trained in full (e.g. lm_head)")
    t.add_argument("--no-quant", action="store_true", help="plain LoRA on the full-precision base")
    t.add_argument("--blocksize", type=int, default=64, help="NF4 block size")
    t.add_argument("--quant-storage", default="uint8", choices=["uint8", "bfloat16", "float16", "float32"],
                   help="storage dtype of the 4-bit weights (bfloat16 for FSDP)")
    t.add_argument("--no-double-quant", action="store_true", help="do not quantize the NF4 block scales again")
    t.add_argument("--steps", type=int, default=100, help="optimizer steps")
    t.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (linear decay, short warm-up)")
    t.add_argument("--batch-size", type=int, default=8, help="sequences per step")
    t.add_argument("--max-length", type=int, default=256, help="tokens per sequence (longer ones are cut)")
    t.add_argument("--packing", action="store_true", help="concatenate examples into --max-length blocks")
    t.add_argument("--eval-split", type=float, default=0.0, help="share of examples held out for the eval loss")
    t.add_argument("--eval-data", type=Path, help="a separate JSONL for the eval loss")
    t.add_argument("--save-steps", type=int, default=0, help="checkpoint every N steps (0: never)")
    t.add_argument("--resume", action="store_true", help="continue an interrupted run from its last checkpoint")
    t.add_argument("--seed", type=int, default=0, help="seed for initialization, shuffling and dropout")
    t.add_argument("--no-gradient-checkpointing", action="store_true",
                   help="keep every layer's activations for the backward pass (faster, more memory) instead of "
                        "recomputing them")
    t.add_argument("--optim", default="adamw_torch", choices=["adamw_torch", "paged_adamw_8bit", "paged_adamw_32bit"],
                   help="optimizer (the Trainer's names); the paged ones are bitsandbytes', paged on a CUDA GPU")

    e = command("export", "merge an adapter and export ONNX for a target, then validate parity")
    e.epilog = ("Before any work, export (and validate, bench) checks the free disk and estimates the command's peak "
                "memory for this base and target (from peaks measured on this project's machines); when the estimate "
                "exceeds the memory available to this process (MemAvailable, or a cgroup memory limit less its "
                "usage) it exits 2. LORA_EXPORT_MEMORY_LIMIT=SIZE (bytes, or like 20G or 64GiB) states the memory to "
                "plan against instead; LORA_EXPORT_MEMORY_LIMIT=off (or 0) skips the memory check.")
    e.add_argument("--base", type=Path, required=True, help="base model directory the adapter was trained on")
    e.add_argument("--adapter", type=Path, required=True, action="append",
                   help="a PEFT adapter directory; repeat it to merge several, combined linearly")
    e.add_argument("--adapter-weight", type=float, action="append",
                   help="one weight per --adapter, in order (default: 1.0 each)")
    e.add_argument("--target", help="a shipped target name (`lora-export targets`) or a .toml file (required, "
                   "except with --into: the export's own)")
    e.add_argument("--out", type=Path, help="export directory to create (must not exist or be empty; required, "
                   "except with --into)")
    e.add_argument("--merge-base", choices=["nf4", "fp4", "original"],
                   help="weights the adapter is merged into: the 4-bit base it was trained on (nf4/fp4) or the original "
                   "weights (default: the 4-bit base when the adapter's training is on record - lora-export's manifest, "
                   "a quantization_config, an axolotl YAML, PEFT's model card, a pre-quantized base - else original)")
    e.add_argument("--bnb-quant-type", choices=["nf4", "fp4"],
                   help="4-bit type the base was quantized with in training (default: the record's, else fp4 as in "
                   "transformers' BitsAndBytesConfig; --merge-base nf4/fp4 sets it too)")
    e.add_argument("--bnb-block-size", type=int,
                   help="bitsandbytes block size used in training (default: the record's, else 64)")
    e.add_argument("--bnb-double-quant", action=argparse.BooleanOptionalAction, default=None,
                   help="whether training quantized the block scales again (default: the record's, else off as in "
                   "BitsAndBytesConfig)")
    e.add_argument("--bnb-load-dtype", choices=["auto", "float32", "bfloat16", "float16"],
                   help="dtype the weights were loaded in before quantizing (default: the record's, else auto: the "
                   "checkpoint's dtype, transformers' from_pretrained default)")
    e.add_argument("--training-config", type=Path,
                   help="a file the training run wrote that records the 4-bit settings: an axolotl YAML, a config.json "
                   "with quantization_config, or PEFT's README.md (default: look in the adapter directory)")
    e.add_argument("--keep-adapter", action="store_true",
                   help="export the unmerged graph: the LoRA as a side path beside each MatMul (plain LoRA/rsLoRA)")
    # --switchable / --into: lora_export/switchable.py
    e.add_argument("--switchable", action="store_true",
                   help="export the base graph with LoRA inputs plus one adapter file per --adapter "
                   "(OUT/adapters/NAME.onnx_adapter), switched per request by ONNX Runtime / onnxruntime-genai")
    e.add_argument("--adapter-name", action="append",
                   help="with --switchable/--into: one name per --adapter, in order (default: the directory names)")
    e.add_argument("--into", type=Path,
                   help="add the --adapter(s) to this existing --switchable export (no rebuild of the base graph)")
    e.add_argument("--allow-pickle", action="store_true",
                   help="accept a pickle-only adapter_model.bin (read with torch.load(weights_only=True))")

    v = command("validate", "parity of an export against the adapted model as trained; exit 1 on failure")
    v.add_argument("export_dir", type=Path, help="a directory written by `lora-export export`")
    v.add_argument("--report", type=Path, help="also write the JSON report here")
    v.add_argument("--junit", type=Path, help="also write JUnit XML here")
    v.add_argument("--prompts", type=Path, help="JSONL of {text} or {prompt, completion} records, the prompt is used (default: the embedded eval set)")

    b = command("bench", "latency of the merged export against the base export; exit 1 over the budget")
    b.add_argument("export_dir", type=Path, help="a directory written by `lora-export export`")
    b.add_argument("--json", type=Path, help="also write the JSON results here")
    b.add_argument("--plot", type=Path, help="write the PNG plot here (default: EXPORT_DIR/bench.png)")
    b.add_argument("--rounds", type=int, default=100, help="interleaved rounds (doubled once if inconclusive)")
    b.add_argument("--eager", action="store_true", help="also time PyTorch eager with the PEFT adapter unmerged")

    g = command("targets", "list or show deployment targets")
    g.add_argument("action", nargs="?", choices=["list", "show"], default="list", help="list them, or show one")
    g.add_argument("name", nargs="?", help="the target to show")
    return p


def _targets(args) -> int:
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


def _run(args, console) -> int:
    say = console.progress
    if args.command == "train":
        from .base import Nf4Settings
        from .train import TrainConfig, step_bar, train

        nf4 = Nf4Settings(double_quant=not args.no_double_quant, blocksize=args.blocksize, compute_dtype="auto",
                          quant_storage=args.quant_storage)
        r = train(TrainConfig(
            base=args.base, data=args.data, out=args.out, rank=args.rank, alpha=args.alpha, dropout=args.dropout,
            target_modules=args.target_modules, use_rslora=args.rslora, use_dora=args.dora,
            modules_to_save=tuple(m for m in args.modules_to_save.split(",") if m), quantize=not args.no_quant,
            steps=args.steps, lr=args.lr, batch_size=args.batch_size, max_length=args.max_length,
            packing=args.packing, eval_split=args.eval_split, eval_data=args.eval_data, save_steps=args.save_steps,
            resume=args.resume, seed=args.seed, gradient_checkpointing=not args.no_gradient_checkpointing,
            optim=args.optim, nf4=nf4), log=say,
            callbacks=[step_bar(console.err)] if console.interactive else ())
        evaluated = f", eval loss {r.eval_loss:.3f}" if r.eval_loss is not None else ""
        console.result(f"adapter written to {r.adapter_dir} (loss {r.first_loss:.3f} -> {r.final_loss:.3f}{evaluated})")
        return EXIT_OK
    if args.command == "export":
        from .pipeline import ExportRequest, export
        from .quantized_base import QuantRequest
        from .switchable import export_command

        switched = export_command(args, say)  # --switchable / --into; None: the merged or side-path export
        if switched is not None:
            return _verdict(console, switched[2], f"switchable export in {switched[0]} (merge base {switched[1]})",
                            switched[0])

        r = export(ExportRequest(base=args.base, adapter=tuple(args.adapter), target=args.target, out=args.out,
                                 adapter_weights=tuple(args.adapter_weight) if args.adapter_weight else None,
                                 merge_base=args.merge_base, allow_pickle=args.allow_pickle,
                                 keep_adapter=args.keep_adapter,
                                 quant=QuantRequest(quant_type=args.bnb_quant_type, blocksize=args.bnb_block_size,
                                                    double_quant=args.bnb_double_quant, load_dtype=args.bnb_load_dtype,
                                                    training_config=args.training_config)), progress=say)
        return _verdict(console, r.parity, f"export written to {r.out} (merge base {r.merge_base})", r.out)
    if args.command == "validate":
        from .pipeline import validate

        return _verdict(console, validate(args.export_dir, args.report, args.junit, args.prompts, progress=say), "",
                        args.export_dir)
    if args.command == "bench":
        from .latency import markdown
        from .pipeline import bench

        r = bench(args.export_dir, args.json, progress=say, rounds=args.rounds, plot_path=args.plot, eager=args.eager)
        console.result(r.markdown() if hasattr(r, "switch_ms") else markdown(r))  # a switchable export's own table
        return EXIT_OK if r.within_budget else EXIT_VERDICT
    if args.command == "demo":
        from .demo import demo

        result = demo(args.out, progress=say, bar=console.err if console.interactive else None)
        console.result(result.table)
        console.result(f"everything is under {result.out}")
        return EXIT_OK if result.passed else EXIT_VERDICT
    raise AssertionError(args.command)


def _verdict(console, report, headline: str, export_dir) -> int:
    from .parity import markdown

    console.result(report.markdown() if hasattr(report, "sections") else markdown(report))  # switchable: sections
    if headline:
        console.result(headline)
    if report.not_checked_on:
        from .parity import pending_on_device

        console.error(pending_on_device(report, str(export_dir)).replace("**", ""))
    if report.passed:
        return EXIT_OK
    for c in report.failures:
        console.error(f"parity FAILED: {c}")
    return EXIT_VERDICT


def _terminate(signum, frame):
    from .errors import Terminated

    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # one is enough; a second must not interrupt the clean-up
    raise Terminated()


def _rank() -> int:
    """This process's rank when torchrun or accelerate launch started several (they set RANK and WORLD_SIZE)."""
    try:
        return int(os.environ.get("RANK", "0")) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else 0
    except ValueError:
        return 0


def _log_home(args) -> Path | None:
    """The folder the command's log ends in: its output directory (the export's for validate and bench)."""
    if args.command in ("validate", "bench"):
        return args.export_dir
    return getattr(args, "out", None) or getattr(args, "into", None)


def _settle_log(tmp_log: Path, home: Path | None, command: str, code: int, append: str | None = None) -> Path | None:
    """Move the log into the output directory when the command wrote one (validate's and bench's export
    directory always exists); keep it where it is when the toolchain failed before any output existed; drop
    it after a bad input or an interruption (the message says everything, and nothing is left behind).
    ``append``: a header line; the log is added under it to the one already there (export --into), written to
    a temporary sibling and renamed into place."""
    if code in (EXIT_BAD_INPUT, 130, 143):
        tmp_log.unlink(missing_ok=True)
        return None
    wrote_output = command in ("validate", "bench") or code in (EXIT_OK, EXIT_VERDICT)
    try:
        if wrote_output and home is not None and Path(home).is_dir() and os.access(home, os.W_OK):
            dest = Path(home) / f"{command}.log"
            if append is None:
                shutil.move(str(tmp_log), dest)
                return dest
            staged_log = dest.with_name(dest.name + ".tmp")
            with open(staged_log, "wb") as f:
                if dest.is_file():
                    f.write(dest.read_bytes())
                f.write(f"\n{append}\n".encode())
                f.write(tmp_log.read_bytes())
            os.replace(staged_log, dest)
            tmp_log.unlink(missing_ok=True)
            return dest
    except OSError:
        pass
    return tmp_log


def _log_header(args) -> str | None:
    """The line an ``export --into`` run's log starts with in the export's export.log (None: a log of its own)."""
    if args.command != "export" or getattr(args, "into", None) is None:
        return None
    import datetime

    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    return f"===== export --into {args.into}: adding {', '.join(map(str, args.adapter))} ({when}) ====="


def _outcome(e: BaseException) -> tuple[int | None, str]:
    """The exit code and message for an exception that ended a command (None: let it propagate)."""
    from .errors import BadInput, LoraExportError, Terminated

    if isinstance(e, BadInput):
        return EXIT_BAD_INPUT, f"lora-export: error: {e}"
    if isinstance(e, LoraExportError):
        return EXIT_TOOLCHAIN, f"lora-export: the toolchain failed: {e}"
    if isinstance(e, KeyboardInterrupt):
        return 130, "lora-export: interrupted (SIGINT); nothing partial was left behind"
    if isinstance(e, Terminated):
        return 143, "lora-export: terminated (SIGTERM); nothing partial was left behind"
    if isinstance(e, Exception):  # not ours: a bug here or in a library; never exit 1, which means a verdict
        return EXIT_TOOLCHAIN, f"lora-export: internal error: {type(e).__name__}: {e}"
    return None, ""  # SystemExit and the like


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is ever downloaded
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    debug, verbose = getattr(args, "debug", False), getattr(args, "verbose", False)
    if args.command == "targets":  # reads a file or two: nothing to log
        try:
            return _targets(args)
        except BaseException as e:
            code, failure = _outcome(e)
            if code is None:
                raise
            if debug:
                traceback.print_exc()
            print(failure, file=sys.stderr)
            return code
    if args.command == "demo" and args.out is None:
        from .demo import default_out

        args.out = default_out()
    from .console import captured

    # Under torchrun/accelerate every process runs the command; the first one (rank 0) speaks for all of them and
    # its log goes with the output. The others write only to their own log, kept (and named) only if they fail.
    rank = _rank() if args.command == "train" else 0
    fd, name = tempfile.mkstemp(prefix=f"lora-export-{args.command}-" + (f"rank{rank}-" if rank else ""), suffix=".log")
    os.close(fd)
    tmp_log, failure, trace = Path(name), None, ""
    # SIGTERM unwinds like Ctrl-C (removing temporary folders) instead of killing the process where it stands
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        with captured(tmp_log, verbose, quiet=rank > 0) as console:
            console.detail(f"lora-export {' '.join(sys.argv[1:] if argv is None else argv)}")
            try:
                code = _run(args, console)
            except BaseException as e:
                signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the clean-up below must not be interrupted
                code, failure = _outcome(e)
                if code is None:
                    raise
                trace = traceback.format_exc()
                console.detail(trace)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
    finally:
        signal.signal(signal.SIGTERM, previous)
    log = _settle_log(tmp_log, _log_home(args) if rank == 0 else None, args.command, code, _log_header(args))
    if rank > 0 and code == EXIT_OK and log is not None:
        log.unlink(missing_ok=True)  # rank 0's log, with the output, is the record
        log = None
    terminal = sys.stderr
    if failure is not None and code in (130, 143) and args.command == "train":
        if rank > 0:
            return code  # interrupted: rank 0 says so for every process
        from .train import checkpoint_dir

        kept = checkpoint_dir(args.out)
        if kept.is_dir() and any(kept.glob("checkpoint-*")):
            failure += f"; its checkpoints are kept in {kept}: rerun with --resume to continue"
    if failure is not None:
        if rank > 0:
            failure = f"[rank {rank}] {failure}"
        if debug:
            print(trace, file=terminal, end="")
        print(failure, file=terminal)
        if code == EXIT_TOOLCHAIN:
            print(f"The full log is {log}; rerun with --debug for the traceback.", file=terminal)
    elif log is not None:
        print(f"log: {log}", file=terminal)
    return code


if __name__ == "__main__":
    sys.exit(main())
