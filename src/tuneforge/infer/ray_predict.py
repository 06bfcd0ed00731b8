"""Batch inference on Ray: ``tuneforge predict RUN --file GLOB --out DIR --ray [ADDRESS]``.

The files matching GLOB (local paths, or URIs such as ``s3://bucket/prefix/*.parquet`` that pyarrow's
filesystems read) are read by Ray tasks, a file at a time, with the one-process reader
(:class:`tuneforge.infer.stream.TextSource`): the same formats, the same strictness and the same ``row``
numbers as ``tuneforge predict --out FILE``. The texts go, in batches, through a pool of actors that
each load the run once (Ray Data's ``map_batches`` over an actor pool); the answers come back to the
driver in input order (Ray Data's ``preserve_order``), which checks that order and writes them as
Parquet parts into a staging folder swapped in as DIR only once every row is done.

Output columns: ``file`` (the input path or URI), then those of the one-process path: ``row``,
``text``, ``label``, ``probability``, with ``--top-k K`` ``label_2``, ``probability_2``, ... and, for
a run with an out-of-scope detector, ``decision`` and ``score``. Rows are ordered by (file, row):
files in sorted path order, rows as in the file. ``DIR/_tuneforge.json`` records the run, the inputs
and the counts; Parquet readers skip it (``pandas.read_parquet(DIR)`` reads the parts in order).

Ray is an optional extra (``pip install 'tuneforge[ray]'``) imported only here, inside functions, so
the default install never loads it. Without an address, a Ray instance is started on this machine's
cores and shut down at the end; with one (``auto``, ``HOST:PORT`` or ``ray://HOST:10001``) the same
code runs on the cluster. There every node needs tuneforge installed, and the input files at their
path (or an ``s3://`` URI); the run directory is shipped through Ray's object store to the nodes
that do not have it at its path (except an adapter run's base model, which each node must have).
"""

from __future__ import annotations

import contextlib
import fnmatch
import glob
import hashlib
import io
import logging
import os
import shutil
import socket
import tarfile
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from tuneforge.errors import DataError, TuneforgeError
from tuneforge.files import atomic_replace_dir, atomic_write_json
from tuneforge.infer.predictor import Prediction, Predictor
from tuneforge.infer.stream import DEFAULT_CHUNK_SIZE, OUTPUT_FORMATS, TextSource, input_format
from tuneforge.rundir import CHECKPOINT_DIR, open_run_dir

MANIFEST_FILE = "_tuneforge.json"
DEFAULT_ROWS_PER_PART = 1_000_000
ACTOR_COLUMN = "_actor"  # which actor answered: counted by the driver, not written
ACTOR_START_TIMEOUT_S = 600
BYTES_PER_ROW = 128  # a short text, its row number and file index: sizes the blocks the actors share
INSTALL_HINT = "pip install 'tuneforge[ray]'"
_GLOB_CHARS = frozenset("*?[")


@dataclass(frozen=True)
class RayPredictResult:
    out: Path
    rows: int
    files: int
    parts: int
    actors: int
    threads: int
    seconds: float  # all of it: the actors' start (each loads the run) included
    startup_seconds: float  # until the first answers came back
    rows_per_actor: dict[str, int]  # "host:pid" of each actor: how the work was spread
    steady_texts_per_second: float = 0.0  # from the first answers to the last: the pool at work

    @property
    def texts_per_second(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else 0.0


def _import_ray() -> Any:
    try:
        import ray
        import ray.data  # the extra is ray[data]: pyarrow-backed datasets
    except ImportError:
        raise TuneforgeError(f"--ray: Ray is not installed; {INSTALL_HINT}") from None
    return ray


# --- inputs ---------------------------------------------------------------------------------------------


def _is_uri(pattern: str) -> bool:
    return "://" in pattern


def _has_glob(text: str) -> bool:
    return any(c in text for c in _GLOB_CHARS)


def _match_parts(parts: Sequence[str], pattern: Sequence[str]) -> bool:
    """Shell-style match segment by segment: ``*`` stays within a folder, ``**`` spans any number of them."""
    if not pattern:
        return not parts
    if pattern[0] == "**":
        return any(_match_parts(parts[i:], pattern[1:]) for i in range(len(parts) + 1))
    return bool(parts) and fnmatch.fnmatchcase(parts[0], pattern[0]) and _match_parts(parts[1:], pattern[1:])


def _expand_uri(pattern: str) -> list[str]:
    import pyarrow.fs as pafs

    scheme = pattern.split("://", 1)[0]
    try:
        fs, path = pafs.FileSystem.from_uri(pattern)
    except (ValueError, OSError) as exc:
        raise DataError(f"--file: cannot open {pattern} ({exc})") from None
    try:
        if not _has_glob(path):
            if fs.get_file_info(path).type != pafs.FileType.File:
                raise DataError(f"--file: {pattern} not found")
            return [pattern]
        parts = PurePosixPath(path).parts
        fixed = next(i for i, part in enumerate(parts) if _has_glob(part))
        base = str(PurePosixPath(*parts[:fixed])) if fixed else "/"
        infos = fs.get_file_info(pafs.FileSelector(base, recursive=len(parts) - fixed > 1, allow_not_found=True))
    except OSError as exc:
        raise DataError(f"--file: cannot list {pattern} ({exc})") from None
    found = sorted(
        info.path
        for info in infos
        if info.type == pafs.FileType.File and _match_parts(PurePosixPath(info.path).parts, parts)
    )
    prefix = f"{scheme}://" if scheme != "file" else "file://"
    return [prefix + p for p in found]


def expand_inputs(pattern: str) -> list[str]:
    """The files ``pattern`` names, in sorted order: a local path or glob (``**`` spans folders), or a URI
    (``s3://``, ``gs://``, ``file://``, ...) with the same wildcards, listed through pyarrow's filesystems.
    Local paths come back absolute, so that Ray workers, whatever their working folder, find them."""
    if _is_uri(pattern):
        files = _expand_uri(pattern)
    elif _has_glob(pattern):
        files = sorted(str(Path(p).resolve()) for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
    else:
        path = Path(pattern)
        if not path.is_file():
            raise DataError(f"--file: {pattern} not found" if not path.exists() else f"--file: {pattern} is not a file")
        files = [str(path.resolve())]
    if not files:
        raise DataError(f"--file: no files match {pattern}")
    for name in files:
        input_format(Path(PurePosixPath(name).name))  # an unsupported type fails here, before Ray starts
    return files


@contextlib.contextmanager
def _local_file(name: str) -> Iterator[Path]:
    """A local path for ``name``: itself, or for a URI a temporary copy (TextSource reads local files)."""
    if not _is_uri(name):
        yield Path(name)
        return
    import pyarrow.fs as pafs

    with tempfile.TemporaryDirectory(prefix="tuneforge-input-") as folder:
        local = Path(folder) / PurePosixPath(name).name
        fs, path = pafs.FileSystem.from_uri(name)
        pafs.copy_files(path, str(local), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
        yield local


def read_file_batches(
    batch: dict[str, np.ndarray], *, files: Sequence[str], text_column: str, encoding: str, chunk_size: int
) -> Iterator[dict[str, np.ndarray]]:
    """Ray task: the texts of the files whose indices are in ``batch["source"]``, ``chunk_size`` at a time."""
    for index in batch["source"]:
        with _local_file(files[int(index)]) as path:
            rows: list[int] = []
            texts: list[str] = []
            for row, text in TextSource(path, text_column=text_column, encoding=encoding):
                rows.append(row)
                texts.append(text)
                if len(rows) == chunk_size:
                    yield _text_batch(int(index), rows, texts)
                    rows, texts = [], []
            if rows:
                yield _text_batch(int(index), rows, texts)


def _text_batch(index: int, rows: list[int], texts: list[str]) -> dict[str, np.ndarray]:
    return {
        "source": np.full(len(rows), index, dtype=np.int64),
        "row": np.asarray(rows, dtype=np.int64),
        "text": np.asarray(texts, dtype=object),
    }


# --- the run, shipped to nodes that lack it ---------------------------------------------------------------


def pack_run(run_dir: Path) -> bytes:
    """The run's files (its resume checkpoints left out) as an uncompressed tar: what a node needs to load it."""
    skip = Path(CHECKPOINT_DIR).parts[0]
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for path in sorted(run_dir.rglob("*")):
            relative = path.relative_to(run_dir)
            if path.is_file() and relative.parts[0] != skip:
                tar.add(path, arcname=relative.as_posix(), recursive=False)
    return buffer.getvalue()


def unpack_run(packed: bytes, digest: str) -> Path:
    """Unpack a shipped run once per node, into a temporary folder named by its content's digest."""
    target = Path(tempfile.gettempdir()) / "tuneforge-runs" / digest
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{digest}."))
    with tarfile.open(fileobj=io.BytesIO(packed)) as tar:
        tar.extractall(staging, filter="data")
    try:
        os.replace(staging, target)
    except OSError:  # another actor on this node got there first
        shutil.rmtree(staging, ignore_errors=True)
    return target


# --- the actors -------------------------------------------------------------------------------------------


def prediction_columns(predictions: Sequence[Prediction], top_k: int) -> dict[str, np.ndarray]:
    """The predictions as columns, named as in the one-process output (``label``, ``probability``,
    ``label_2``, ``probability_2``, ... and ``decision``, ``score`` where the run has a detector)."""
    columns: dict[str, np.ndarray] = {
        "label": np.asarray([p.label for p in predictions], dtype=object),
        "probability": np.asarray([p.probability for p in predictions], dtype=np.float64),
    }
    for rank in range(2, top_k + 1):
        runners = [p.top_k[rank - 1] if len(p.top_k) >= rank else (None, np.nan) for p in predictions]
        columns[f"label_{rank}"] = np.asarray([label for label, _ in runners], dtype=object)
        columns[f"probability_{rank}"] = np.asarray([prob for _, prob in runners], dtype=np.float64)
    if predictions and predictions[0].decision is not None:
        columns["decision"] = np.asarray([p.decision for p in predictions], dtype=object)
        columns["score"] = np.asarray([float(p.score or 0.0) for p in predictions], dtype=np.float64)
    return columns


class PredictorActor:
    """One Ray actor: loads the run once, then classifies batch after batch."""

    def __init__(self, run_dir: str, *, threads: int, form: str, top_k: int, shipped: list[Any] | None = None) -> None:
        path = Path(run_dir)
        if not path.is_dir() and shipped:
            import ray

            packed_ref, digest = shipped
            path = unpack_run(ray.get(packed_ref), digest)
        self.predictor = Predictor(path, threads=threads, form=form)
        self.top_k = top_k
        self.name = f"{socket.gethostname()}:{os.getpid()}"

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        texts = [str(text) for text in batch["text"]]
        predictions = self.predictor.predict(texts, top_k=self.top_k)
        columns = {"source": batch["source"], "row": batch["row"], "text": batch["text"]}
        columns |= prediction_columns(predictions, self.top_k)
        columns[ACTOR_COLUMN] = np.full(len(texts), self.name, dtype=object)
        return columns


# --- the driver -------------------------------------------------------------------------------------------


def check_out_dir(out: Path) -> None:
    """``--out`` is replaced only if missing, empty, or an earlier output of this command."""
    if out.suffix.lower() in OUTPUT_FORMATS:
        raise TuneforgeError(
            f"--out: with --ray, --out names a folder for Parquet parts, not a {out.suffix} file; "
            "drop --ray to write one file"
        )
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise TuneforgeError(f"--out: {out} exists and is not a folder; with --ray, --out names a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / MANIFEST_FILE).is_file():
        raise TuneforgeError(
            f"--out: {out} is not empty and holds no {MANIFEST_FILE} (not an earlier --ray output); "
            "refusing to replace it: choose a new or empty folder"
        )


def _tuneforge_error(exc: BaseException) -> TuneforgeError | None:
    """The TuneforgeError behind a Ray task's failure, if that is what it was (a bad row in a file)."""
    seen: set[int] = set()
    stack: list[BaseException | None] = [exc]
    while stack:
        current = stack.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, TuneforgeError):
            return current
        stack += [current.__cause__, current.__context__, getattr(current, "cause", None)]
    return None


def _pool_size(ray: Any, actors: int | None, threads: int | None) -> tuple[int, int]:
    cpus = int(ray.cluster_resources().get("CPU", 1))
    if actors is None:
        threads = threads or 1
        actors = max(1, cpus // threads)
    elif threads is None:
        threads = max(1, cpus // actors)
    if actors * threads > cpus:
        raise TuneforgeError(
            f"--actors {actors} x --threads {threads} needs {actors * threads} CPUs; the Ray cluster has {cpus}"
        )
    return actors, threads


def _column_type(name: str) -> Any:
    import pyarrow as pa

    if name.startswith("probability"):
        return pa.float64()
    return pa.int64() if name in ("source", "row") else (pa.float64() if name == "score" else pa.string())


class _PartWriter:
    """Writes the ordered answers into ``folder/part-00000.parquet``, ... at most ``rows_per_part`` each."""

    def __init__(self, folder: Path, files: Sequence[str], rows_per_part: int) -> None:
        self.folder = folder
        self.files = files
        self.rows_per_part = rows_per_part
        self.parts = 0
        self.rows = 0
        self._writer: Any = None
        self._in_part = 0
        self._last: tuple[int, int] = (-1, 0)
        self._names: Any = None
        self.rows_per_actor: dict[str, int] = {}
        self.first_at: float | None = None  # perf_counter when the first answers came, and how many
        self.first_rows = 0
        self.last_at = 0.0

    def write(self, batch: Any) -> None:
        import pyarrow as pa
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        sources = batch.column("source").to_numpy()
        rows = batch.column("row").to_numpy()
        if len(sources) == 0:
            return
        self.last_at = time.perf_counter()
        if self.first_at is None:
            self.first_at, self.first_rows = self.last_at, len(sources)
        keys = sources.astype(np.int64) * (1 << 40) + rows.astype(np.int64)
        first = self._last[0] * (1 << 40) + self._last[1]
        if keys[0] <= first or (len(keys) > 1 and not bool(np.all(np.diff(keys) > 0))):
            raise TuneforgeError("ray: the answers came back out of order or twice; nothing was written")
        self._last = (int(sources[-1]), int(rows[-1]))
        if self._names is None:
            self._names = pa.array(list(self.files), pa.string())
        columns = {"file": pc.take(self._names, pa.array(sources))}
        for count in pc.value_counts(batch.column(ACTOR_COLUMN)).to_pylist():
            actor = str(count["values"])
            self.rows_per_actor[actor] = self.rows_per_actor.get(actor, 0) + int(count["counts"])
        for name in batch.column_names:
            if name not in ("source", ACTOR_COLUMN):
                columns[name] = batch.column(name).cast(_column_type(name))
        table = pa.table(columns)
        start = 0
        while start < table.num_rows:
            if self._writer is None:
                path = self.folder / f"part-{self.parts:05d}.parquet"
                self._writer = pq.ParquetWriter(path, table.schema)
                self.parts += 1
                self._in_part = 0
            take = min(self.rows_per_part - self._in_part, table.num_rows - start)
            self._writer.write_table(table.slice(start, take))
            self._in_part += take
            self.rows += take
            start += take
            if self._in_part >= self.rows_per_part:
                self.close()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def predict_with_ray(
    run_dir: Path | str,
    pattern: str,
    out: Path | str,
    *,
    address: str | None = None,
    actors: int | None = None,
    threads: int | None = None,
    top_k: int = 1,
    batch_size: int = DEFAULT_CHUNK_SIZE,
    text_column: str = "text",
    encoding: str = "utf-8",
    form: str = "auto",
    rows_per_part: int = DEFAULT_ROWS_PER_PART,
    show_progress: bool = True,
    console: Any = None,
) -> RayPredictResult:
    """Classify every text of the files ``pattern`` names on Ray and write them, ordered, into ``out``.

    ``address``: None starts (and afterwards stops) a Ray instance on this machine, unless this process
    is already connected to one, which is then used and left running; otherwise the cluster to join.
    ``actors`` x ``threads`` must fit the cluster's CPUs; by default one thread per actor and as many
    actors as CPUs (each holds a copy of the model), or as many threads as the CPUs share out.
    """
    for option, value in (
        ("--top-k", top_k),
        ("--chunk-size", batch_size),
        ("--actors", actors),
        ("--threads", threads),
    ):
        if value is not None and value < 1:
            raise TuneforgeError(f"{option}: must be at least 1, got {value}")
    if rows_per_part < 1:
        raise TuneforgeError(f"rows_per_part: must be at least 1, got {rows_per_part}")
    out = Path(out)
    check_out_dir(out)
    run = open_run_dir(run_dir)  # a missing run fails here, before Ray starts
    run_path = str(run.path.resolve())
    files = expand_inputs(pattern)
    for name in files:
        if not _is_uri(name):
            TextSource(Path(name), text_column=text_column, encoding=encoding)  # header and first record
    ray = _import_ray()
    started_here = not ray.is_initialized()
    if started_here:
        try:
            # No num_cpus: Ray counts the cores this process may use (container limits included).
            ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
        except (ConnectionError, RuntimeError, ValueError, TimeoutError) as exc:
            where = f"the Ray cluster at {address}" if address else "a local Ray instance"
            raise TuneforgeError(f"--ray: cannot start or reach {where}: {exc}") from None
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    # Noise about choices made here: Ray's own progress bars are off (the driver shows one), and the pool's
    # input is counted in files before they are split into blocks of a batch.
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message="The minimum number of concurrent actors", category=UserWarning)
    try:
        actors, threads = _pool_size(ray, actors, threads)
        shipped = None
        if address is not None:
            packed = pack_run(Path(run_path))
            shipped = [ray.put(packed), hashlib.sha256(packed).hexdigest()[:24]]
        start = time.perf_counter()
        dataset = _pipeline(
            ray, files, run_path, actors, threads, top_k, batch_size, text_column, encoding, form, shipped
        )
        holder: dict[str, _PartWriter] = {}

        def write(folder: Path) -> None:
            writer = holder["writer"] = _PartWriter(folder, files, rows_per_part)
            try:
                _drain(dataset, writer, show_progress, console)
            finally:
                writer.close()
            if writer.rows == 0:
                raise DataError(f"{pattern}: has no texts")
            atomic_write_json(
                folder / MANIFEST_FILE,
                {
                    "run": run_path,
                    "inputs": list(files),
                    "rows": writer.rows,
                    "parts": writer.parts,
                    "top_k": top_k,
                    "text_column": text_column,
                    "actors": actors,
                    "threads_per_actor": threads,
                    "rows_per_actor": writer.rows_per_actor,
                    "seconds": round(time.perf_counter() - start, 3),
                    "startup_seconds": round((writer.first_at or start) - start, 3),
                    "steady_texts_per_second": round(_steady_rate(writer), 1),
                },
            )

        try:
            atomic_replace_dir(out, write)
        except TuneforgeError:
            raise
        except Exception as exc:
            cause = _tuneforge_error(exc)
            if cause is None:
                raise
            raise type(cause)(str(cause)) from None
        writer = holder["writer"]
        return RayPredictResult(
            out=out,
            rows=writer.rows,
            files=len(files),
            parts=writer.parts,
            actors=actors,
            threads=threads,
            seconds=time.perf_counter() - start,
            startup_seconds=(writer.first_at or start) - start,
            steady_texts_per_second=_steady_rate(writer),
            rows_per_actor=dict(writer.rows_per_actor),
        )
    finally:
        if started_here:
            ray.shutdown()


def _steady_rate(writer: _PartWriter) -> float:
    """Texts/s after the first answers: what the pool sustains, start-up aside (0 with one batch only)."""
    if writer.first_at is None or writer.last_at <= writer.first_at:
        return 0.0
    return (writer.rows - writer.first_rows) / (writer.last_at - writer.first_at)


def _pipeline(
    ray: Any,
    files: Sequence[str],
    run_path: str,
    actors: int,
    threads: int,
    top_k: int,
    batch_size: int,
    text_column: str,
    encoding: str,
    form: str,
    shipped: list[Any] | None,
) -> Any:
    # A dataset keeps the context it was made in, so these settings hold for this one and are undone after.
    context = ray.data.DataContext.get_current()
    options = context.execution_options
    before = (options.preserve_order, context.enable_progress_bars, context.target_max_block_size)
    before_wait = context.wait_for_min_actors_s
    options.preserve_order = True  # answers come back in input order
    context.enable_progress_bars = False  # the driver shows its own
    # Ray Data merges a task's output into blocks of up to 128 MiB, and a block goes to one actor: a file
    # would be one block, classified by one actor. Blocks of about a batch (texts of ~100 bytes) spread a
    # file over the pool. (A streaming repartition by rows would be exact, but its tasks need a CPU, which
    # the actors hold: it waits forever.)
    context.target_max_block_size = max(4096, batch_size * BYTES_PER_ROW)
    # Start classifying once every actor has loaded the run, not with the first one alone; a cluster that
    # cannot place them all (nor scale up to) fails after this long instead of waiting forever.
    context.wait_for_min_actors_s = ACTOR_START_TIMEOUT_S
    try:
        sources = ray.data.from_items([{"source": i} for i in range(len(files))], override_num_blocks=len(files))
        # Reading is light next to the model: the read tasks take no CPU from the actors' share.
        texts = sources.map_batches(
            read_file_batches,
            batch_size=1,
            num_cpus=0,
            fn_kwargs={
                "files": list(files),
                "text_column": text_column,
                "encoding": encoding,
                "chunk_size": batch_size,
            },
        )
        return texts.map_batches(
            PredictorActor,
            batch_size=batch_size,
            compute=ray.data.ActorPoolStrategy(size=actors),
            num_cpus=threads,
            fn_constructor_args=(run_path,),
            fn_constructor_kwargs={"threads": threads, "form": form, "top_k": top_k, "shipped": shipped},
        )
    finally:
        options.preserve_order, context.enable_progress_bars, context.target_max_block_size = before
        context.wait_for_min_actors_s = before_wait


def _drain(dataset: Any, writer: _PartWriter, show_progress: bool, console: Any) -> None:
    from rich.console import Console
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    progress = Progress(
        SpinnerColumn(),
        TextColumn("[bold]classifying on Ray[/bold]"),
        TextColumn("{task.fields[rows]:,} texts"),
        TimeElapsedColumn(),
        console=console or Console(stderr=True),
        disable=not show_progress,
    )
    with progress:
        task = progress.add_task("classify", total=None, rows=0)
        for batch in dataset.iter_batches(batch_format="pyarrow", batch_size=None):
            writer.write(batch)
            progress.update(task, rows=writer.rows)
