"""Batch inference on Ray against one process: rows/s and peak memory on a ~1M-row file.

The texts of Banking77 (train + test) and SST-2 (train + dev), repeated in turn up to ``--rows``
(default 1,000,000), are written once to a Parquet file. Then, each in a fresh process, one after
another:

- ``one-process``: ``tuneforge predict RUN --file F --out preds.jsonl`` with ``--threads`` = all cores;
- ``ray-N``: ``tuneforge predict RUN --file F --out DIR --ray --actors N`` with cores/N threads per
  actor, for each N of ``--actors`` (default 1 and 2).

Reported per configuration: wall seconds of the whole command (start-up, Ray's start, model loads
and writing included) and rows/s over it; the texts/s the command itself prints (one process: after
the model is loaded; Ray: the whole run, actors' start included) and, for Ray, from ``DIR/_tuneforge.json``
the start-up seconds (until the first answers) and the "steady" texts/s after them; the peak RSS of
the command's own process and, for Ray, of each actor
(``VmHWM`` from ``/proc``, polled every ``--poll`` seconds while it runs; an actor's last reading is
its peak up to then, which for a process that lives until the end is its peak). The Ray outputs'
labels are compared with the one-process output's, row by row. Records are appended to
``benchmarks/results/ray_predict.jsonl``.

    python benchmarks/bench_ray_predict.py --run runs/banking77
    python benchmarks/bench_ray_predict.py --run RUN --smoke     # 2,000 rows: checks the script, not the speed

Needs the ray extra (``pip install -e '.[ray]'``) and the datasets under ``$TUNEFORGE_DATA_DIR``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench_data import RESULTS_DIR, append_result, dataset

RESULTS = RESULTS_DIR / "ray_predict.jsonl"
ACTOR_MARK = "PredictorActor"  # Ray titles an actor's process ray::MapWorker(MapBatches(PredictorActor))


def corpus_texts() -> list[str]:
    """Banking77's and SST-2's texts, both splits of each, as the readers of training see them."""
    from tuneforge.data import read_labelled_file

    texts: list[str] = []
    for name in ("banking77", "sst2"):
        data = dataset(name)
        for path in (data.train, data.evaluation):
            texts += read_labelled_file(path, text_column=data.text_column, require_labels=False).texts
    return texts


def write_input(path: Path, texts: list[str], rows: int) -> None:
    """``rows`` texts, the corpus over and over, as one Parquet file (row groups of 64k)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    with pq.ParquetWriter(path, pa.schema([("text", pa.string())])) as writer:
        for start in range(0, rows, 65_536):
            count = min(65_536, rows - start)
            chunk = [texts[(start + i) % len(texts)] for i in range(count)]
            writer.write_table(pa.table({"text": pa.array(chunk, pa.string())}))


def _peak_rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _parent(pid: int) -> int:
    try:
        # /proc/PID/stat: "pid (comm) state ppid ..."; comm may hold spaces and brackets, so split after ")"
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return 0


def _descends_from(pid: int, root: int) -> bool:
    while pid > 1:
        if pid == root:
            return True
        pid = _parent(pid)
    return False


def _actor_pids(root: int) -> list[int]:
    """The PredictorActor processes under ``root`` (not a previous command's, still shutting down)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if ACTOR_MARK in (entry / "cmdline").read_bytes().decode(errors="replace"):
                    pids.append(int(entry.name))
            except OSError:
                continue
    return [pid for pid in pids if _descends_from(pid, root)]


class MemoryWatch:
    """Polls the peak RSS of a process and of every PredictorActor process while a command runs."""

    def __init__(self, pid: int, every: float) -> None:
        self.pid = pid
        self.every = every
        self.main_mb = 0.0
        self.actors_mb: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.main_mb = max(self.main_mb, _peak_rss_mb(self.pid) or 0.0)
            for pid in _actor_pids(self.pid):
                peak = _peak_rss_mb(pid)
                if peak is not None:
                    self.actors_mb[pid] = max(self.actors_mb.get(pid, 0.0), peak)
            self._stop.wait(self.every)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def run_command(argv: list[str], poll: float) -> dict[str, Any]:
    """Run one ``tuneforge`` command in a fresh process; wall time, its printed rate and peak memory."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env["COLUMNS"] = "400"  # rich wraps the summary line at 80 columns otherwise
    with tempfile.TemporaryFile("w+", encoding="utf-8") as log:
        start = time.perf_counter()
        child = subprocess.Popen(
            [sys.executable, "-m", "tuneforge", *argv], stdout=subprocess.DEVNULL, stderr=log, env=env
        )
        watch = MemoryWatch(child.pid, poll)
        _, status, usage = os.wait4(child.pid, 0)
        code = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - start
        watch.stop()
        log.seek(0)
        stderr = log.read()
    if code != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({code}):\n{stderr[-3000:]}")
    rate = re.search(r"\(([\d,.]+)\s+texts/s", stderr)
    return {
        "wall_s": round(wall, 1),
        # one process: from the model loaded to the last row; Ray: the whole run, actors' start included
        "reported_texts_per_s": float(rate.group(1).replace(",", "")) if rate else None,
        # the command's own process (polled); wait4's figure is the largest of it and the children it waited for
        "main_peak_rss_mb": round(watch.main_mb, 1),
        "waited_max_rss_mb": round(usage.ru_maxrss / 1024, 1),
        "actor_peak_rss_mb": sorted(round(v, 1) for v in watch.actors_mb.values()),
    }


def labels_of_jsonl(path: Path) -> list[str]:
    with path.open(encoding="utf-8") as handle:
        return [json.loads(line)["label"] for line in handle]


def labels_of_parquet(folder: Path) -> tuple[list[str], list[int]]:
    import pyarrow.parquet as pq

    table = pq.read_table(folder, columns=["row", "label"])
    return table.column("label").to_pylist(), table.column("row").to_pylist()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, required=True, help="a trained run directory")
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--actors", type=int, nargs="+", default=[1, 2], help="pool sizes to measure")
    parser.add_argument("--cores", type=int, default=os.cpu_count() or 1, help="threads shared out (default: all)")
    parser.add_argument("--chunk-size", type=int, default=1024)
    parser.add_argument("--poll", type=float, default=1.0, help="seconds between memory readings")
    parser.add_argument("--workdir", type=Path, help="where the input and outputs go (default: a temporary folder)")
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"JSON lines appended here (default {RESULTS})")
    parser.add_argument("--smoke", action="store_true", help="2,000 rows, a check of the script, not of the speed")
    args = parser.parse_args()
    if args.smoke:
        args.rows = min(args.rows, 2_000)
    if not args.run.is_dir():
        raise SystemExit(f"--run: {args.run} not found")

    with tempfile.TemporaryDirectory(prefix="bench-ray-", dir=args.workdir) as folder:
        work = Path(folder)
        source = work / "texts.parquet"
        started = time.perf_counter()
        texts = corpus_texts()
        write_input(source, texts, args.rows)
        print(
            f"input: {args.rows:,} rows from {len(texts):,} texts in {time.perf_counter() - started:.0f} s", flush=True
        )
        common = {"run": str(args.run), "rows": args.rows, "chunk_size": args.chunk_size, "smoke": args.smoke}
        predict = ["predict", str(args.run), "--file", str(source), "--chunk-size", str(args.chunk_size)]

        one = work / "one.jsonl"
        result = run_command([*predict, "--out", str(one), "--threads", str(args.cores), "--no-progress"], args.poll)
        reference = labels_of_jsonl(one)
        one.unlink()
        record = {**common, "config": "one-process", "actors": 0, "threads": args.cores, **result}
        record["rows_per_s"] = round(args.rows / result["wall_s"], 1)
        print(json.dumps(append_result(args.out, record)), flush=True)

        for actors in args.actors:
            threads = max(1, args.cores // actors)
            out = work / f"ray-{actors}"
            argv = [*predict, "--out", str(out), "--ray", "--actors", str(actors), "--threads", str(threads)]
            result = run_command([*argv, "--no-progress"], args.poll)
            labels, rows = labels_of_parquet(out)
            manifest = json.loads((out / "_tuneforge.json").read_text(encoding="utf-8"))
            result["startup_s"] = manifest["startup_seconds"]
            result["steady_texts_per_s"] = manifest["steady_texts_per_second"]
            result["rows_per_actor"] = sorted(manifest["rows_per_actor"].values())
            agree = sum(a == b for a, b in zip(labels, reference, strict=False)) / max(1, len(reference))
            record = {**common, "config": f"ray-{actors}", "actors": actors, "threads": threads, **result}
            record["rows_per_s"] = round(args.rows / result["wall_s"], 1)
            record["rows_out"] = len(rows)
            record["rows_in_order"] = rows == list(range(1, args.rows + 1))
            record["labels_agree_with_one_process"] = round(agree, 6)
            print(json.dumps(append_result(args.out, record)), flush=True)
    print(f"results appended to {args.out}")


if __name__ == "__main__":
    main()
