"""How many items a second can this CPU score with a given ONNX classifier, at best?

A roofline for issue 18's throughput target: it counts the weight matmuls' operations per token in
an ONNX file (the work that scales with the model) and measures what ONNX Runtime's int8 and fp32
matmuls sustain on this machine in a chain shaped like a BERT layer (same session options as
tuneforge's ONNX classifier, dynamic int8 exactly as ``optimize`` quantizes). Their ratio, divided
by the tokens an item has, bounds items/s from above: the rest of the model (attention scores,
LayerNorm, GELU, quantizing activations) and the monitor only subtract from it.

    python benchmarks/bench_int8_ceiling.py --onnx runs/X/variants/onnx-int8/onnx/model.onnx \
        --tokens 31 --threads 2

Prints one JSON object (and writes it with ``--out``).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from tuneforge.optimize.quantize import quantize_onnx_dynamic

WEIGHT_OPS = {"MatMul", "MatMulInteger", "Gemm", "DynamicQuantizeMatMul", "MatMulIntegerToFloat"}


def weight_macs_per_token(path: Path) -> dict[str, Any]:
    """Multiply-accumulates per token of every matmul whose second operand is a stored weight."""
    model = onnx.load(str(path), load_external_data=False)
    shapes = {init.name: list(init.dims) for init in model.graph.initializer}
    macs, count = 0, 0
    for node in model.graph.node:
        if node.op_type not in WEIGHT_OPS or len(node.input) < 2:
            continue
        weight = shapes.get(node.input[1])
        if weight is None or len(weight) != 2:
            continue  # activation x activation (attention scores): depends on length, counted apart
        if node.op_type == "Gemm" and any(a.name == "transB" and a.i for a in node.attribute):
            weight = weight[::-1]
        macs += weight[0] * weight[1]
        count += 1
    return {"weight_matmuls": count, "macs_per_token": macs}


def _chain(hidden: int, inner: int, layers: int, rows: int, folder: Path) -> Path:
    """fp32 ONNX file: x @ W_in @ W_out, `layers` times (a BERT feed-forward block without GELU)."""
    rng = np.random.default_rng(0)
    nodes, inits, name = [], [], "x"
    for i in range(layers):
        for j, (k, n) in enumerate(((hidden, inner), (inner, hidden))):
            weight = f"w{i}_{j}"
            inits.append(numpy_helper.from_array((rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32), weight))
            nodes.append(helper.make_node("MatMul", [name, weight], [f"h{i}_{j}"]))
            name = f"h{i}_{j}"
    graph = helper.make_graph(
        nodes,
        "chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [rows, hidden])],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, [rows, hidden])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = folder / "chain-fp32.onnx"
    onnx.save(model, str(path))
    return path


def _gops(path: Path, rows: int, hidden: int, macs: int, threads: int, seconds: float) -> list[float]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.inter_op_num_threads = 1
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).standard_normal((rows, hidden)).astype(np.float32)
    for _ in range(3):
        session.run(None, {"x": x})
    passes = []
    for _ in range(5):
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            session.run(None, {"x": x})
            n += 1
        passes.append(2 * macs * rows * n / (time.perf_counter() - start) / 1e9)
    return passes


def cpu() -> dict[str, Any]:
    """lscpu's model name and the vector flags that decide int8 speed (VNNI, AVX-512, AMX)."""
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return {"model": platform.processor() or platform.machine(), "flags": []}
    fields = {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in text.splitlines())}
    flags = fields.get("Flags", "").split()
    return {
        "model": fields.get("Model name", platform.machine()),
        "flags": sorted(f for f in flags if f.startswith(("avx", "amx", "fma", "f16c"))),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--onnx", type=Path, action="append", default=[], help="model file(s) to count")
    parser.add_argument("--tokens", type=float, required=True, help="mean tokens per item (padding included)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=384)
    parser.add_argument("--inner", type=int, default=1536)
    parser.add_argument("--rows", type=int, default=64 * 32, help="tokens per run: a batch of 64 items of 32")
    parser.add_argument("--seconds", type=float, default=2.0, help="length of each of 5 timed passes")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    layers = 6
    chain_macs = layers * 2 * args.hidden * args.inner
    with tempfile.TemporaryDirectory() as work:
        fp32 = _chain(args.hidden, args.inner, layers, args.rows, Path(work))
        int8 = quantize_onnx_dynamic(fp32, Path(work) / "chain-int8.onnx")
        ceiling = {}
        for name, path in (("fp32", fp32), ("int8", int8), ("fp32 again", fp32), ("int8 again", int8)):
            passes = _gops(path, args.rows, args.hidden, chain_macs, args.threads, args.seconds)
            ceiling.setdefault(name.split()[0], []).extend(passes)
    result: dict[str, Any] = {
        "cpu": cpu(),
        "threads": args.threads,
        "chain": f"{layers} x ({args.rows}x{args.hidden} @ {args.hidden}x{args.inner} @ {args.inner}x{args.hidden})",
        "gops": {
            k: {"passes": [round(v, 1) for v in vs], "median": round(statistics.median(vs), 1)}
            for k, vs in ceiling.items()
        },
        "models": {},
    }
    best = statistics.median(ceiling["int8"])
    for path in args.onnx:
        counted = weight_macs_per_token(path)
        gop_per_item = 2 * counted["macs_per_token"] * args.tokens / 1e9
        counted["gop_per_item"] = round(gop_per_item, 4)
        counted["items_per_s_at_int8_ceiling"] = round(best / gop_per_item, 1)
        result["models"][str(path)] = counted
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
