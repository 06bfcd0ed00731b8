"""Does ONNX Runtime's transformer fusion make a better int8 model than optimize's plain export + dynamic int8?

optimize exports with the model's own attention (SDPA) and quantizes that graph; ONNX Runtime's offline BERT
optimizer (``onnxruntime.transformers.optimizer``) can fuse each layer's attention into one ``Attention`` op,
which dynamic quantization turns into ``QAttention``, but only when the exported graph has the pattern it
knows: an export with eager attention. This script exports ``--run`` three ways (as optimize does; the
optimizer on that export; the optimizer on an eager-attention export), quantizes each as optimize does
(QInt8, per channel), and scores every file on the monitor benchmark's held-out 20% of Financial PhraseBank:
accuracy, the logit error against the fp32 export (mean |difference| / logit std), and texts/s over
``--passes`` passes, the files taking turns (2 threads, batches of 64, length-sorted as in inference).

    python benchmarks/bench_ort_fusion.py --run runs/fpb-student-mpnet-a1
"""

from __future__ import annotations

import argparse
import csv
import statistics
import time
from pathlib import Path

import numpy as np

from bench_data import RESULTS_DIR, append_result
from bench_monitor import split
from tuneforge.infer.predictor import Predictor
from tuneforge.models.onnx_runtime import OnnxClassifier
from tuneforge.models.runs import load_run_classifier
from tuneforge.optimize.export import export_onnx
from tuneforge.optimize.quantize import quantize_onnx_dynamic
from tuneforge.rundir import RunDir

WORK = RESULTS_DIR / "ort_fusion"


def build(run: Path) -> dict[str, Path]:
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.transformers import optimizer

    WORK.mkdir(parents=True, exist_ok=True)
    model, _ = load_run_classifier(RunDir(run))
    files = {"fp32": export_onnx(model, WORK / "fp32.onnx")}
    files["int8"] = quantize_onnx_dynamic(files["fp32"], WORK / "int8.onnx")
    model.set_attn_implementation("eager")
    eager = export_onnx(model, WORK / "eager-fp32.onnx")
    config = model.config
    for name, source in (("fused-int8", files["fp32"]), ("eager-fused-int8", eager)):
        fused = optimizer.optimize_model(
            str(source), model_type="bert", num_heads=config.num_attention_heads, hidden_size=config.hidden_size
        )
        print(name, {op: n for op, n in fused.get_fused_operator_statistics().items() if n})
        fused.save_model_to_file(str(WORK / f"{name}-fp32.onnx"))
        # The fused graph's contrib ops defeat the quantizer's shape inference: tell it their outputs are float.
        quantize_dynamic(
            str(WORK / f"{name}-fp32.onnx"),
            str(WORK / f"{name}.onnx"),
            per_channel=True,
            weight_type=QuantType.QInt8,
            extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
        )
        files[name] = WORK / f"{name}.onnx"
    return files


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0, help="the held-out split's seed")
    parser.add_argument("--passes", type=int, default=6)
    args = parser.parse_args()

    files = build(args.run)
    with (split(args.seed) / "heldout.csv").open(encoding="utf-8", newline="") as handle:
        rows = [(row["text"], row["label"]) for row in csv.DictReader(handle)]
    # The texts as inference reads them (cleaning, the run's max_length): the Predictor's own encoding.
    predictor = Predictor(args.run, threads=2)
    encoded = predictor._encode([text for text, _ in rows])
    truth = np.array([predictor.labels.index(label) for _, label in rows])
    classifiers = {name: OnnxClassifier(path, threads=2) for name, path in files.items()}
    logits = {name: c.logits(encoded, pad_id=predictor.pad_id, batch_size=64) for name, c in classifiers.items()}
    speeds: dict[str, list[float]] = {name: [] for name in files}
    for _ in range(args.passes):
        for name, classifier in classifiers.items():
            started = time.perf_counter()
            classifier.logits(encoded, pad_id=predictor.pad_id, batch_size=64)
            speeds[name].append(len(encoded) / (time.perf_counter() - started))
    reference = logits["fp32"]
    for name in files:
        record = {
            "run": str(args.run),
            "file": name,
            "heldout_accuracy": round(100 * float((logits[name].argmax(1) == truth).mean()), 2),
            "error_vs_fp32": round(float(np.abs(logits[name] - reference).mean() / reference.std()), 4),
            "texts_per_s": [round(s, 1) for s in speeds[name]],
            "texts_per_s_mean": round(statistics.mean(speeds[name]), 1),
        }
        print(record)
        append_result(RESULTS_DIR / "ort_fusion.jsonl", record)


if __name__ == "__main__":
    main()
