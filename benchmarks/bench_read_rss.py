"""Peak memory (RSS) of reading and auditing a large generated CSV, for this code and, optionally, another.

Writes a CSV of about ``--size-mb`` (texts of ~100 characters with a few exact duplicates and
conflicting labels, five labels), then runs each task in a fresh Python process per code version and
reports the child's peak RSS (``ru_maxrss`` from ``wait4``) next to the file size:

- ``read_audit``: ``read_labelled_file`` then ``audit_splits`` on it (no tokenizer);
- ``prepare``: ``prepare_data`` as ``tuneforge train`` runs it (read, clean, split off 5%, audit);
- ``import``: only the imports, the baseline both include.

    python benchmarks/bench_read_rss.py --size-mb 1024 --before /tmp/tf-before/src

``--before`` (and ``--after``, by default this checkout) is the ``src`` folder of a checkout, e.g. one
made by ``git worktree add /tmp/tf-before REV``: a fixed commit is not changed under a long run.
Each child runs under an address-space limit (``--limit-gb``) so that a version needing more fails
alone instead of pushing a shared machine out of memory. The generated file is deleted at the end
unless ``--keep``; records are appended to ``benchmarks/results/read_rss.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "read_rss.jsonl"
LABELS = ("billing", "delivery", "refund", "account", "other")
WORDS = (
    "the order arrived late and my card was charged twice so please look into the refund for this account "
    "today because the parcel never showed up although tracking said delivered yesterday morning at noon"
).split()

CHILD = r"""
import json, resource, sys, time
task, path = sys.argv[1], sys.argv[2]
start = time.perf_counter()
rows = 0
if task == "read_audit":
    from tuneforge.data import audit_splits, read_labelled_file
    data = read_labelled_file(path)
    report = audit_splits({"train": data})
    rows = len(data)
elif task == "prepare":
    from tuneforge.config import DataConfig
    from tuneforge.data import prepare_data
    prepared = prepare_data(DataConfig(train=path), seed=0)
    rows = len(prepared.train) + len(prepared.validation)
else:
    import tuneforge.config, tuneforge.data.audit, tuneforge.data.prepare  # noqa: F401
import tuneforge
print(json.dumps({"rows": rows, "seconds": round(time.perf_counter() - start, 1), "module": tuneforge.__file__}))
"""


def generate(path: Path, size_mb: float, seed: int = 0) -> int:
    """Write a CSV of about ``size_mb`` MiB; returns its number of data rows."""
    rng = random.Random(seed)
    templates = [" ".join(rng.choices(WORDS, k=rng.randint(12, 22))) for _ in range(2000)]
    target = int(size_mb * 2**20)
    rows = 0
    with path.open("w", encoding="utf-8", newline="") as handle:
        handle.write("text,label\n")
        while handle.tell() < target:
            lines = []
            for _ in range(100_000):
                i = rows
                template = i % len(templates)
                if i % 50 == 49:
                    text, label = f"{templates[template]} {i - 1}", LABELS[template % 5]  # exact duplicate
                elif i % 1000 == 999:
                    text, label = f"{templates[template]} {i - 2}", LABELS[(template + 1) % 5]  # conflict
                else:
                    text, label = f"{templates[template]} {i}", LABELS[template % 5]
                lines.append(f"{text},{label}\n")
                rows += 1
            handle.write("".join(lines))
    return rows


def run_child(task: str, path: Path, src: Path, limit_gb: float) -> dict:
    """Run one task in a fresh interpreter with ``src`` first on the path; its own peak RSS from ``wait4``.

    ``wait4`` gives the resource use of that one child; ``RUSAGE_CHILDREN`` would be the maximum over
    every child so far.
    """
    env = {**os.environ, "PYTHONPATH": str(src)}
    limit = int(limit_gb * 2**30)

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as err:
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, task, str(path)],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            preexec_fn=cap,
        )
        assert child.stdout is not None
        stdout = child.stdout.read()
        child.stdout.close()
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)  # reaped here; Popen must not wait again
        err.seek(0)
        stderr = err.read()
    record: dict = {
        "task": task,
        "src": str(src),
        "peak_rss_mib": round(usage.ru_maxrss / 1024, 1),  # Linux reports KiB
        "wall_s": round(time.perf_counter() - start, 1),
    }
    if child.returncode != 0:
        last = (stderr.strip().splitlines() or ["?"])[-1]
        record["error"] = f"exit {child.returncode}: {last}"
    else:
        record.update(json.loads(stdout.strip().splitlines()[-1]))
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mb", type=float, default=1024.0, help="size of the generated CSV in MiB")
    parser.add_argument("--file", type=Path, default=Path("/tmp/tuneforge-rss-bench.csv"))
    parser.add_argument("--after", type=Path, default=ROOT / "src", help="src folder of the new code")
    parser.add_argument("--before", type=Path, help="src folder of the code to compare against")
    parser.add_argument("--only-before", action="store_true", help="measure only --before")
    parser.add_argument("--tasks", default="import,read_audit,prepare")
    parser.add_argument("--limit-gb", type=float, default=12.0, help="address-space limit of each child")
    parser.add_argument("--keep", action="store_true", help="keep the generated file")
    parser.add_argument("--reuse", action="store_true", help="measure --file as it is if it exists (implies --keep)")
    args = parser.parse_args()

    versions = [] if args.only_before else [("after", args.after.resolve())]
    if args.before:
        versions.append(("before", args.before.resolve()))
    if not versions:
        parser.error("--only-before needs --before")
    if args.reuse and args.file.is_file():
        args.keep = True
        with args.file.open("rb") as handle:
            rows = sum(1 for _ in handle) - 1
    else:
        print(f"writing {args.file} (~{args.size_mb:g} MiB) ...", flush=True)
        rows = generate(args.file, args.size_mb)
    size_mib = args.file.stat().st_size / 2**20
    print(f"{args.file}: {size_mib:,.1f} MiB, {rows:,} rows", flush=True)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    try:
        for task in args.tasks.split(","):
            for name, src in versions:
                record = run_child(task, args.file, src, args.limit_gb)
                record.update(
                    version=name,
                    file_mib=round(size_mib, 1),
                    file_rows=rows,
                    limit_gb=args.limit_gb,
                    date=datetime.now(UTC).isoformat(timespec="seconds"),
                )
                with RESULTS.open("a", encoding="utf-8") as handle:
                    handle.write(json.dumps(record) + "\n")
                shown = record.get("error") or f"{record['seconds']} s in the task"
                print(f"{task:<10} {name:<6} peak RSS {record['peak_rss_mib']:>9,.1f} MiB  ({shown})", flush=True)
    finally:
        if not args.keep:
            args.file.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
