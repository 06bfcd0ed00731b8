"""Serving benchmark: ``tuneforge serve`` against a naive FastAPI + HF ``pipeline`` handler, and batch inference.

Three parts, all in one run on one machine, so the ratios hold even when absolute numbers drift:

* ``load``: a bounded load generator (loopback only; each level stops at ``--requests`` requests or
  ``--seconds`` seconds, whichever comes first) measures requests/s and p50/p95/p99 latency at 1, 8,
  32 and 64 concurrent clients, one text per request, for the tuneforge server and for a naive
  FastAPI handler that calls ``pipeline("text-classification", model=RUN/model)`` once per request.
  Both run in their own process with the same thread count; the clients keep their connections
  open (HTTP/1.1 keep-alive) and send the same texts.
* ``soak``: ``--soak-seconds`` at 64 clients against the tuneforge server, counting errors by kind;
  503 answers (queue full: deliberate back-pressure) are counted separately from real errors.
* ``batch``: throughput and accuracy of the Predictor (fp32 run, and an int8 ONNX variant run with
  ``--int8-run``) against the HF ``pipeline`` with batch_size 32, on SST-2 dev and Banking77 test.

    python benchmarks/bench_serve.py --run banking77=runs/b77 --run sst2=runs/sst2 \\
        --int8-run banking77=runs/b77-int8 --int8-run sst2=runs/sst2-int8 --soak-seconds 300
    python benchmarks/bench_serve.py --run banking77=runs/b77 --smoke     # ~20 s check of the script

The load and soak parts serve ``--serve-run`` (default: the first ``--run``). Datasets come from
``$TUNEFORGE_DATA_DIR`` (default ``../shared/data``). Results are appended as JSON lines to
``benchmarks/results/serve.jsonl`` and printed as markdown tables.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from bench_data import DATASETS, RESULTS_DIR, ROOT

RESULTS = RESULTS_DIR / "serve.jsonl"
LEVELS = (1, 8, 32, 64)
LOOPBACK = "127.0.0.1"  # the only address this benchmark ever sends to


# --- a small keep-alive HTTP/1.1 client: cheap enough not to be the bottleneck ----------------------


class HttpConnection:
    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            try:
                await self.writer.wait_closed()
            except OSError:
                pass
        self.reader = self.writer = None

    async def post_json(self, path: str, payload: bytes) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(LOOPBACK, self.port)
        assert self.reader is not None
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {LOOPBACK}:{self.port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\n\r\n"
        )
        self.writer.write(head.encode("ascii") + payload)
        await self.writer.drain()
        status_line = await self.reader.readuntil(b"\r\n")
        status = int(status_line.split(b" ", 2)[1])
        headers: dict[str, str] = {}
        while (line := await self.reader.readuntil(b"\r\n")) != b"\r\n":
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        if headers.get("transfer-encoding", "").lower() == "chunked":
            body = b""
            while size := int((await self.reader.readuntil(b"\r\n")).strip(), 16):
                body += await self.reader.readexactly(size + 2)
            await self.reader.readuntil(b"\r\n")
        else:
            body = await self.reader.readexactly(int(headers.get("content-length", "0")))
        if headers.get("connection", "").lower() == "close":
            await self.close()
        return status, body


@dataclass
class LoadResult:
    clients: int
    seconds: float
    latencies_ms: list[float] = field(default_factory=list)
    outcomes: Counter[str] = field(default_factory=Counter)

    @property
    def ok(self) -> int:
        return self.outcomes.get("200", 0)

    def percentile(self, q: float) -> float | None:
        if not self.latencies_ms:
            return None
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]

    def summary(self) -> dict[str, object]:
        errors = {kind: n for kind, n in self.outcomes.items() if kind != "200"}
        return {
            "clients": self.clients,
            "requests_ok": self.ok,
            "seconds": round(self.seconds, 3),
            "rps": round(self.ok / self.seconds, 2) if self.seconds else 0.0,
            "p50_ms": _round(self.percentile(50)),
            "p95_ms": _round(self.percentile(95)),
            "p99_ms": _round(self.percentile(99)),
            "mean_ms": _round(statistics.fmean(self.latencies_ms) if self.latencies_ms else None),
            "deliberate_503": errors.pop("503", 0),
            "errors": errors,
        }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


async def send_one(
    connection: HttpConnection, path: str, payload: bytes, result: LoadResult, timeout_s: float = 30.0
) -> None:
    """POST one request and record its outcome (and latency, when answered) in ``result``; a failed
    connection is closed so that the next request opens a new one."""
    sent = time.perf_counter()
    try:
        status, _ = await asyncio.wait_for(connection.post_json(path, payload), timeout_s)
    except TimeoutError:
        result.outcomes["timeout"] += 1
        await connection.close()
        return
    except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
        result.outcomes[type(exc).__name__] += 1
        await connection.close()
        await asyncio.sleep(0.01)
        return
    result.outcomes[str(status)] += 1
    if status == 200:
        result.latencies_ms.append((time.perf_counter() - sent) * 1000)
    elif status == 503:
        await asyncio.sleep(0.05)  # honour back-pressure instead of hammering


async def generate_load(
    port: int,
    texts: list[str],
    *,
    clients: int,
    max_requests: int,
    max_seconds: float,
    timeout_s: float = 30.0,
    path: str = "/v1/classify",
    first_client: int = 0,
) -> LoadResult:
    """``clients`` closed-loop clients posting ``{"text": ...}`` to ``path``, bounded by both a request count
    and a time limit. ``first_client`` numbers them after another load's, so that two loads running side by
    side start at different texts."""
    payloads = [json.dumps({"text": text}).encode("utf-8") for text in texts]
    result = LoadResult(clients=clients, seconds=0.0)
    issued = 0
    started = time.perf_counter()
    deadline = started + max_seconds

    async def client(index: int) -> None:
        nonlocal issued
        connection = HttpConnection(port)
        cursor = (first_client + index) * 7919  # each client walks the texts from a different place
        try:
            while issued < max_requests and time.perf_counter() < deadline:
                issued += 1
                await send_one(connection, path, payloads[cursor % len(payloads)], result, timeout_s)
                cursor += 1
        finally:
            await connection.close()

    await asyncio.gather(*(client(i) for i in range(clients)))
    result.seconds = time.perf_counter() - started
    return result


# --- servers under test, each in its own process ------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((LOOPBACK, 0))
        return int(probe.getsockname()[1])


class ServerProcess:
    def __init__(self, name: str, command: list[str], port: int) -> None:
        self.name = name
        self.port = port
        # A file, not a pipe: a pipe nobody reads during a long soak could fill up and stall the server.
        self.log = tempfile.TemporaryFile("w+", encoding="utf-8")  # closed in stop()
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT, text=True, cwd=ROOT)

    def log_tail(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()[-2000:]

    def wait_ready(self, timeout_s: float = 180) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SystemExit(f"{self.name} server exited:\n{self.log_tail()}")
            try:
                with socket.create_connection((LOOPBACK, self.port), timeout=1) as sock:
                    sock.sendall(f"GET /ready HTTP/1.1\r\nHost: {LOOPBACK}\r\nConnection: close\r\n\r\n".encode())
                    if b" 200 " in sock.recv(64):
                        return
            except OSError:
                pass
            time.sleep(0.2)
        tail = self.log_tail()
        self.stop()
        raise SystemExit(f"{self.name} server not ready after {timeout_s:.0f} s:\n{tail}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()


def tuneforge_server(run: Path, threads: int, args: argparse.Namespace) -> ServerProcess:
    port = free_port()
    command = [sys.executable, "-m", "tuneforge", "serve", str(run), "--host", LOOPBACK, "--port", str(port)]
    command += ["--threads", str(threads), "--log-level", "warning", "--max-batch-size", str(args.max_batch_size)]
    command += ["--max-wait-ms", str(args.max_wait_ms), "--workers", str(args.workers)]
    return ServerProcess("tuneforge", command, port)


def naive_server(run: Path, threads: int) -> ServerProcess:
    port = free_port()
    command = [sys.executable, __file__, "--naive-server", str(run), "--port", str(port), "--threads", str(threads)]
    return ServerProcess("naive", command, port)


def run_naive_server(run: Path, port: int, threads: int) -> None:
    """What a user would write without tuneforge: one pipeline call per request, in FastAPI's thread pool."""
    import torch
    import uvicorn
    from fastapi import Body, FastAPI
    from transformers import pipeline

    torch.set_num_threads(threads)
    classifier = pipeline("text-classification", model=str(run / "model"), device=-1)
    max_length = run_max_length(run)  # truncate exactly as tuneforge does: equal work per text
    classifier("warm up")
    app = FastAPI()

    @app.post("/v1/classify")
    def classify(text: str = Body(..., embed=True)) -> dict:  # body {"text": ...}, as tuneforge's
        return {"predictions": classifier(text, truncation=True, max_length=max_length)}

    @app.get("/ready")
    def is_ready() -> dict:
        return {"ready": True}  # the server listens only once the pipeline has loaded

    uvicorn.run(app, host=LOOPBACK, port=port, log_level="warning", access_log=False)


def run_max_length(run: Path) -> int:
    import yaml

    saved = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8")) or {}
    return int((saved.get("model") or {}).get("max_length", 128))


# --- data and batch inference ---------------------------------------------------------------------------


def load_split(name: str, limit: int | None = None) -> tuple[list[str], list[str]]:
    from tuneforge.data import read_labelled_file

    split = DATASETS[name]
    if not split.evaluation.is_file():
        raise SystemExit(f"{split.evaluation}: not found; set TUNEFORGE_DATA_DIR to the folder holding {name}/")
    data = read_labelled_file(split.evaluation, text_column=split.text_column, label_column=split.label_column)
    texts, labels = data.texts, data.labels
    return (texts[:limit], labels[:limit]) if limit else (texts, labels)


def bench_batch(name: str, run: Path, int8_run: Path | None, threads: int, batch_size: int, limit: int | None) -> list:
    import torch
    from transformers import pipeline

    from tuneforge.infer.predictor import Predictor

    torch.set_num_threads(threads)
    texts, gold = load_split(name, limit)
    rows = []

    def measure(engine: str, predict: object) -> None:
        predict(texts[:16])  # type: ignore[operator]  # warm-up: lazy initialisation is not throughput
        started = time.perf_counter()
        labels = predict(texts)  # type: ignore[operator]
        seconds = time.perf_counter() - started
        accuracy = 100.0 * sum(p == g for p, g in zip(labels, gold, strict=True)) / len(gold)
        rows.append(
            {
                "part": "batch",
                "dataset": name,
                "engine": engine,
                "n": len(texts),
                "seconds": round(seconds, 3),
                "samples_per_s": round(len(texts) / seconds, 2),
                "accuracy": round(accuracy, 2),
                "batch_size": batch_size,
            }
        )
        print(f"  {name} {engine}: {len(texts) / seconds:.1f} samples/s, accuracy {accuracy:.2f}", flush=True)

    predictor = Predictor(run, threads=threads, batch_size=batch_size)
    measure(f"tuneforge-{predictor.form}-fp32", lambda t: [p.label for p in predictor.predict(t)])
    if int8_run is not None:
        int8 = Predictor(int8_run, threads=threads, batch_size=batch_size)
        variant = int8.run.variant().get("name") or int8.form
        measure(f"tuneforge-{variant}", lambda t: [p.label for p in int8.predict(t)])
    max_length = predictor.max_length
    classifier = pipeline("text-classification", model=str(run / "model"), device=-1)
    measure(
        "hf-pipeline",
        lambda t: [r["label"] for r in classifier(t, batch_size=batch_size, truncation=True, max_length=max_length)],
    )
    base = rows[-1]["samples_per_s"]
    for row in rows:
        row["x_pipeline"] = round(row["samples_per_s"] / base, 2)
    return rows


# --- orchestration --------------------------------------------------------------------------------------------


def _pairs(values: list[str], option: str) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for value in values:
        name, sep, folder = value.partition("=")
        if not sep or name not in DATASETS:
            raise SystemExit(f"{option}: expected NAME=RUN_DIR with NAME one of {', '.join(DATASETS)}, got {value!r}")
        out[name] = Path(folder)
    return out


def _record(path: Path, rows: list[dict], common: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps({"bench": "serve", **common, **row}) + "\n")


def _load_texts(args: argparse.Namespace, serve_name: str | None) -> list[str]:
    for name in [serve_name, *DATASETS]:
        if name and DATASETS[name].evaluation.is_file():
            return load_split(name, 2000)[0]
    return [f"sample request number {i} about a parcel, a refund or a film" for i in range(200)]


def naive_run_for(serve_run: Path, given: Path | None) -> Path:
    """The plain HF model folder's run: an ONNX variant has none, so its source run is used."""
    if given is not None:
        return given
    if (serve_run / "model" / "config.json").is_file():
        return serve_run
    variant = serve_run / "variant.json"
    source = json.loads(variant.read_text(encoding="utf-8")).get("source_run") if variant.is_file() else None
    if source and (Path(source) / "model" / "config.json").is_file():
        return Path(source)
    raise SystemExit(f"{serve_run}: no model/ folder for the naive pipeline handler; pass --naive-run RUN_DIR")


def run_load(args: argparse.Namespace, serve_run: Path, texts: list[str]) -> tuple[list[dict], list[dict]]:
    servers = [("tuneforge", lambda: tuneforge_server(serve_run, args.threads, args))]
    if not args.skip_naive:
        naive_run = naive_run_for(serve_run, args.naive_run)
        print(f"load: the naive handler runs {naive_run / 'model'}", flush=True)
        servers.append(("naive", lambda: naive_server(naive_run, args.naive_threads)))
    load_rows: list[dict] = []
    soak_rows: list[dict] = []
    for name, start in servers:
        server = start()
        try:
            server.wait_ready()
            asyncio.run(generate_load(server.port, texts, clients=4, max_requests=40, max_seconds=10))  # warm-up
            for clients in args.levels:
                result = asyncio.run(
                    generate_load(
                        server.port, texts, clients=clients, max_requests=args.requests, max_seconds=args.seconds
                    )
                )
                row = {"part": "load", "server": name, **result.summary()}
                load_rows.append(row)
                print(
                    f"  {name} {clients:>3} clients: {row['rps']} req/s, p99 {row['p99_ms']} ms, "
                    f"503: {row['deliberate_503']}, errors: {row['errors'] or 'none'}",
                    flush=True,
                )
            if name == "tuneforge" and args.soak_seconds > 0:
                result = asyncio.run(
                    generate_load(
                        server.port,
                        texts,
                        clients=64,
                        max_requests=int(args.soak_seconds * 5000),
                        max_seconds=args.soak_seconds,
                    )
                )
                soak_rows.append({"part": "soak", "server": name, **result.summary()})
                print(f"  soak: {soak_rows[-1]}", flush=True)
        finally:
            server.stop()
    return load_rows, soak_rows


def _fmt(value: object) -> str:
    return "–" if value is None else str(value)


def _verdict(ok: bool, text: str) -> str:
    return f"{'PASS' if ok else 'FAIL'}: {text}"


def print_tables(load_rows: list[dict], soak_rows: list[dict], batch_rows: list[dict]) -> list[str]:
    verdicts: list[str] = []
    if load_rows:
        columns = ["clients", "tuneforge req/s", "p50 ms", "p95 ms", "p99 ms", "naive req/s", "p50 ms", "p95 ms"]
        columns += ["p99 ms", "ratio"]
        print("\n| " + " | ".join(columns) + " |")
        print("|" + "---:|" * len(columns))
        by = {(r["server"], r["clients"]): r for r in load_rows}
        for clients in sorted({r["clients"] for r in load_rows}):
            t, n = by.get(("tuneforge", clients), {}), by.get(("naive", clients), {})
            ratio = round(t["rps"] / n["rps"], 2) if t and n and n.get("rps") else None
            cells = [clients, t.get("rps"), t.get("p50_ms"), t.get("p95_ms"), t.get("p99_ms")]
            cells += [n.get("rps"), n.get("p50_ms"), n.get("p95_ms"), n.get("p99_ms"), ratio]
            print("| " + " | ".join(_fmt(c) for c in cells) + " |")
            if clients == 32 and ratio is not None:
                p99 = t.get("p99_ms") or float("inf")
                verdicts.append(_verdict(ratio >= 5 and p99 <= 250, f"32 clients: {ratio}x naive, p99 {p99} ms"))
    for row in soak_rows:
        print(
            f"\nsoak {row['seconds']} s at 64 clients: {row['requests_ok']} ok, {row['rps']} req/s, "
            f"p99 {row['p99_ms']} ms, deliberate 503: {row['deliberate_503']}, errors: {row['errors'] or 'none'}"
        )
        verdicts.append(_verdict(not row["errors"], f"soak errors other than deliberate 503s: {row['errors'] or 0}"))
    if batch_rows:
        print("\n| dataset | engine | samples/s | accuracy | x pipeline |")
        print("|---|---|---:|---:|---:|")
        for row in batch_rows:
            cells = [row["dataset"], row["engine"], row["samples_per_s"], row["accuracy"], row["x_pipeline"]]
            print("| " + " | ".join(_fmt(c) for c in cells) + " |")
            if row["engine"].startswith("tuneforge"):
                target = 1.5 if row["engine"].endswith("fp32") else 4.0
                text = f"{row['dataset']} {row['engine']}: {row['x_pipeline']}x the pipeline (target {target}x)"
                verdicts.append(_verdict(row["x_pipeline"] >= target, text))
    if verdicts:
        print("\n" + "\n".join(verdicts))
    return verdicts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", action="append", default=[], metavar="NAME=RUN_DIR", help="fp32 run per dataset")
    parser.add_argument("--int8-run", action="append", default=[], metavar="NAME=RUN_DIR", help="int8 variant run")
    parser.add_argument("--serve-run", type=Path, help="run served in the load test (default: the first --run)")
    parser.add_argument(
        "--naive-run",
        type=Path,
        help="run whose model/ the naive handler loads (default: the served run or its source)",
    )
    parser.add_argument("--parts", default="load,batch", help="comma-separated: load, batch")
    parser.add_argument("--levels", default=",".join(map(str, LEVELS)), help="concurrent clients per level")
    parser.add_argument("--requests", type=int, default=3000, help="requests per level at most")
    parser.add_argument("--seconds", type=float, default=60.0, help="seconds per level at most")
    parser.add_argument("--soak-seconds", type=float, default=0.0, help="soak at 64 clients (e.g. 300)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="model threads, both servers")
    parser.add_argument("--batch-size", type=int, default=32, help="batch inference: both engines")
    parser.add_argument("--max-batch-size", type=int, default=32, help="tuneforge serve --max-batch-size")
    parser.add_argument("--workers", type=int, default=1, help="tuneforge serve --workers (each with --threads)")
    parser.add_argument(
        "--naive-threads", type=int, default=os.cpu_count() or 1, help="model threads of the naive handler (all cores)"
    )
    parser.add_argument("--max-wait-ms", type=float, default=1.0, help="tuneforge serve --max-wait-ms")
    parser.add_argument("--limit", type=int, help="batch inference: first N examples only")
    parser.add_argument("--skip-naive", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"JSON lines appended here (default {RESULTS})")
    parser.add_argument("--smoke", action="store_true", help="a ~20 s run that checks the script, not the speed")
    parser.add_argument("--naive-server", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.naive_server:
        run_naive_server(args.naive_server, args.port, args.threads)
        return
    runs, int8_runs = _pairs(args.run, "--run"), _pairs(args.int8_run, "--int8-run")
    serve_run = args.serve_run or (next(iter(runs.values())) if runs else None)
    serve_name = next((name for name, run in runs.items() if run == serve_run), None)
    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    args.levels = [int(x) for x in args.levels.split(",")]
    if args.smoke:
        args.levels, args.requests, args.seconds = [1, 8], 30, 3.0
        args.soak_seconds = min(args.soak_seconds, 2.0) if args.soak_seconds else 2.0
        args.limit = args.limit or 64
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    common = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} {os.cpu_count()} cores",
        "threads": args.threads,
        "smoke": args.smoke,
    }
    load_rows: list[dict] = []
    soak_rows: list[dict] = []
    batch_rows: list[dict] = []
    if "load" in parts:
        if serve_run is None:
            raise SystemExit("load: give --serve-run RUN_DIR or --run NAME=RUN_DIR")
        print(f"load: serving {serve_run} with {args.threads} threads", flush=True)
        load_rows, soak_rows = run_load(args, serve_run, _load_texts(args, serve_name))
        _record(args.out, load_rows + soak_rows, {**common, "run": str(serve_run)})
    if "batch" in parts:
        for name, run in runs.items():
            if not DATASETS[name].evaluation.is_file():
                print(f"batch: skipping {name}: {DATASETS[name].evaluation} not found")
                continue
            print(f"batch: {name} with {run}", flush=True)
            rows = bench_batch(name, run, int8_runs.get(name), args.threads, args.batch_size, args.limit)
            _record(args.out, rows, {**common, "run": str(run), "int8_run": str(int8_runs.get(name) or "")})
            batch_rows += rows
    print_tables(load_rows, soak_rows, batch_rows)


if __name__ == "__main__":
    main()
