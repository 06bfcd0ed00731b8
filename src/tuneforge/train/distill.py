"""Knowledge distillation (Hinton et al. 2015): learn from a trained teacher's softened predictions.

The teacher is fixed, so its logits on the training set are computed once, before training, with the
teacher's own tokenizer and max length (it may differ from the student's), and looked up by example
index in every batch. That pass can take as long as the training itself (a 12-layer teacher over
64k texts: ~20 min on 2 cores), so the logits are kept beside the run's checkpoint and a resumed run
reuses them.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file as save_numpy
from safetensors.torch import save_file

from tuneforge.config import DistillConfig
from tuneforge.data.batching import encode_texts
from tuneforge.errors import ConfigError, TuneforgeError
from tuneforge.files import atomic_write_with, cache_dir
from tuneforge.models.loading import predict_logits
from tuneforge.models.runs import load_run_classifier
from tuneforge.rundir import ADAPTER_DIR, MODEL_DIR, RunDir, open_run_dir

#: The label of a transfer-data example: the teacher's logits are its only target.
NO_LABEL = -100


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float,
    alpha: float,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """``alpha · T² · KL(softmax(t/T) ‖ softmax(s/T)) + (1 − alpha) · CE(s, labels)``, averaged over examples.

    KL summed over classes; the ``T²`` keeps the soft term's gradients on the same scale whatever the
    temperature. ``label_smoothing`` applies to the CE term only. The teacher's logits carry no gradient.
    An example labelled ``NO_LABEL`` (transfer data, which only the teacher labels) counts with the KL
    term alone, at full weight.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be between 0 and 1, got {alpha}")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} differ"
        )
    student = student_logits.float()
    has_label = labels != NO_LABEL
    if bool(has_label.all()):  # the usual case, in the usual reductions (alpha 0 is plain cross-entropy, bit for bit)
        loss = student.new_zeros(())
        if alpha > 0:
            kl = F.kl_div(*_log_softmaxes(student, teacher_logits, temperature), reduction="batchmean", log_target=True)
            loss = loss + alpha * temperature**2 * kl
        if alpha < 1:
            loss = loss + (1 - alpha) * F.cross_entropy(student, labels, label_smoothing=label_smoothing)
        return loss
    kl_each = F.kl_div(*_log_softmaxes(student, teacher_logits, temperature), reduction="none", log_target=True)
    kl_weight = torch.where(has_label, alpha, 1.0).to(student.dtype)
    loss = kl_weight * temperature**2 * kl_each.sum(dim=-1)
    if alpha < 1 and bool(has_label.any()):
        ce = F.cross_entropy(student, labels.clamp(min=0), label_smoothing=label_smoothing, reduction="none")
        loss = loss + torch.where(has_label, (1.0 - alpha) * ce, 0.0)
    return loss.mean()


def _log_softmaxes(
    student: torch.Tensor, teacher_logits: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    return (
        F.log_softmax(student / temperature, dim=-1),
        F.log_softmax(teacher_logits.detach().float() / temperature, dim=-1),
    )


def teacher_targets(
    cfg: DistillConfig,
    texts: list[str],
    labels: list[str],
    *,
    needed: list[int] | None = None,
    batch_size: int = 128,
    on_batch: Callable[[int], None] | None = None,
    on_cached: Callable[[int], None] | None = None,
    device: torch.device | None = None,
) -> torch.Tensor:
    """The teacher run's logits ``[len(texts), len(labels)]`` on ``texts``, in input order (on the CPU; the
    teacher runs on ``device``, default the CPU).

    Only the rows in ``needed`` (default: all) are filled; the others are zeros, for examples whose
    loss does not read the teacher (labelled rows when ``alpha`` is 0). Rows the teacher has scored
    before, in any run, come from its :class:`TeacherLogitsCache`; the rest are scored in chunks, each
    added to the cache as it finishes, so an interrupted pass loses at most one chunk.
    ``on_batch`` is called with the number of texts in each finished batch, ``on_cached`` once with the
    number found in the cache (for a progress bar).
    """
    if cfg.teacher is None:
        raise ConfigError("distill.teacher: no teacher run directory given")
    try:
        run = open_run_dir(cfg.teacher)
        teacher_labels = run.labels()
    except TuneforgeError as exc:
        raise ConfigError(f"distill.teacher: {exc}") from None
    if teacher_labels != labels:
        raise ConfigError(
            f"distill.teacher: {cfg.teacher} was trained on labels {teacher_labels[:5]}... but this run has "
            f"{labels[:5]}...; a teacher must have the same labels in the same order"
        )
    teacher_config = run.config_or_none()
    max_length = teacher_config.model.max_length if teacher_config else 128
    cache = TeacherLogitsCache.for_teacher(run, max_length)
    logits = np.zeros((len(texts), len(labels)), dtype=np.float32)
    missing = []
    for i in range(len(texts)) if needed is None else needed:
        row = cache.get(texts[i])
        if row is None:
            missing.append(i)
        else:
            logits[i] = row
    if on_cached is not None:
        on_cached(len(texts) - len(missing) if needed is None else len(needed) - len(missing))
    if missing:
        try:
            model, tokenizer = load_run_classifier(run)
        except TuneforgeError as exc:
            raise ConfigError(f"distill.teacher: {exc}") from None
        model.to(device or torch.device("cpu"))
        for start in range(0, len(missing), CACHE_CHUNK):
            chunk = missing[start : start + CACHE_CHUNK]
            chunk_texts = [texts[i] for i in chunk]
            encoded = encode_texts(tokenizer, chunk_texts, max_length)
            scored = predict_logits(
                model, encoded, pad_id=tokenizer.pad_token_id or 0, batch_size=batch_size, on_batch=on_batch
            )
            logits[chunk] = scored
            cache.add(chunk_texts, scored)
    return torch.from_numpy(logits)


#: Texts the teacher scores between two saves of its cache (~1-2 minutes for a 12-layer teacher on 2 cores).
CACHE_CHUNK = 4096


class TeacherLogitsCache:
    """A teacher's logits per text, kept across runs: students with other seeds, sizes or transfer data
    pay only for the texts the teacher has not seen (a 12-layer teacher scores ~50 texts/s on 2 cores).

    One safetensors file per teacher under ``$TUNEFORGE_CACHE/teacher-logits/`` (default
    ``~/.cache/tuneforge``), named by a hash of the teacher's weights, labels and max length, so a
    retrained teacher never serves its predecessor's logits. Rows are found by a 16-byte hash of the
    text. The file is rewritten atomically on every :meth:`add`, merged with what other processes (the
    ranks of a distributed run, each scoring its share) added meanwhile; an unreadable file is ignored
    (it can only be made again) and an unwritable cache folder only costs the reuse.
    """

    def __init__(self, path: Path, num_labels: int) -> None:
        self.path = path
        self._num_labels = num_labels
        self._rows: dict[bytes, np.ndarray] = self._read()

    def _read(self) -> dict[bytes, np.ndarray]:
        if not self.path.is_file():
            return {}
        try:
            with safe_open(str(self.path), framework="np") as handle:
                digests, logits = handle.get_tensor("digests"), handle.get_tensor("logits")
            if digests.shape[0] == logits.shape[0] and logits.shape[1:] == (self._num_labels,):
                return {bytes(d): row for d, row in zip(digests, logits.astype(np.float32), strict=True)}
        except (SafetensorError, OSError, KeyError, ValueError, IndexError):
            pass
        return {}

    @classmethod
    def for_teacher(cls, run: RunDir, max_length: int) -> TeacherLogitsCache:
        digest = hashlib.sha256(json.dumps({"labels": run.labels(), "max_length": max_length}).encode("utf-8"))
        for weights in sorted(
            [*run.path.glob(f"{MODEL_DIR}/*.safetensors"), *run.path.glob(f"{ADAPTER_DIR}/*.safetensors")]
        ):
            digest.update(weights.name.encode("utf-8"))
            with weights.open("rb") as handle:
                for block in iter(lambda: handle.read(1 << 22), b""):
                    digest.update(block)
        return cls(cache_dir("teacher-logits") / f"{digest.hexdigest()[:32]}.safetensors", len(run.labels()))

    def __len__(self) -> int:
        return len(self._rows)

    @staticmethod
    def _key(text: str) -> bytes:
        return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()

    def get(self, text: str) -> np.ndarray | None:
        return self._rows.get(self._key(text))

    def add(self, texts: list[str], logits: np.ndarray) -> None:
        for text, row in zip(texts, logits, strict=True):
            self._rows[self._key(text)] = np.asarray(row, dtype=np.float32)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with _exclusive(self.path.with_name(self.path.name + ".lock")):
                self._rows = {**self._read(), **self._rows}  # rows other processes added since we read the file
                digests = np.frombuffer(b"".join(self._rows), dtype=np.uint8).reshape(len(self._rows), 16)
                empty = np.zeros((0, self._num_labels), np.float32)
                stacked = np.stack(list(self._rows.values())) if self._rows else empty
                atomic_write_with(
                    self.path,
                    lambda tmp: save_numpy({"digests": np.ascontiguousarray(digests), "logits": stacked}, str(tmp)),
                )
        except OSError:
            pass  # the cache is a saving, not a result: the logits in hand are still right


@contextmanager
def _exclusive(lock_file: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``lock_file`` (POSIX ``flock``; elsewhere no lock: a lost row is only re-scored)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with lock_file.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _fingerprint(cfg: DistillConfig, texts: list[str]) -> str:
    """Which teacher scored which texts: cached logits are reused only for exactly these."""
    digest = hashlib.sha256(str(Path(cfg.teacher or "").resolve()).encode("utf-8"))
    for text in texts:
        digest.update(b"\0" + text.encode("utf-8"))
    return digest.hexdigest()


def save_teacher_logits(path: Path, logits: torch.Tensor, cfg: DistillConfig, texts: list[str]) -> None:
    """Keep the teacher's logits (safetensors, written atomically) for a resumed run."""
    metadata = {"fingerprint": _fingerprint(cfg, texts)}
    atomic_write_with(path, lambda tmp: save_file({"logits": logits.contiguous()}, str(tmp), metadata=metadata))


def load_teacher_logits(path: Path, cfg: DistillConfig, texts: list[str]) -> torch.Tensor | None:
    """The kept logits if they were made by this teacher for exactly these texts; otherwise None."""
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as handle:
            if (handle.metadata() or {}).get("fingerprint") != _fingerprint(cfg, texts):
                return None
            logits = handle.get_tensor("logits")
    except (SafetensorError, OSError, KeyError):
        return None  # unreadable or foreign: recomputing is only slower, never wrong
    return logits if logits.shape[0] == len(texts) else None
