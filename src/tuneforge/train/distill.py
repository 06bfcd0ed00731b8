"""Knowledge distillation (Hinton et al. 2015): learn from a trained teacher's softened predictions.

The teacher is fixed, so its logits on the training set are computed once, before training, with the
teacher's own tokenizer and max length (it may differ from the student's), and looked up by example
index in every batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import yaml

from tuneforge.config import DistillConfig
from tuneforge.data.batching import encode_texts
from tuneforge.errors import ConfigError, TuneforgeError
from tuneforge.models.loading import predict_logits
from tuneforge.models.runs import load_run_classifier
from tuneforge.rundir import open_run_dir


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float,
    alpha: float,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """``alpha · T² · KL(softmax(t/T) ‖ softmax(s/T)) + (1 − alpha) · CE(s, labels)``.

    KL summed over classes and averaged over examples; the ``T²`` keeps the soft term's gradients on
    the same scale whatever the temperature. ``label_smoothing`` applies to the CE term only. The
    teacher's logits carry no gradient.
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
    loss = student.new_zeros(())
    if alpha > 0:
        log_student = F.log_softmax(student / temperature, dim=-1)
        log_teacher = F.log_softmax(teacher_logits.detach().float() / temperature, dim=-1)
        kl = F.kl_div(log_student, log_teacher, reduction="batchmean", log_target=True)
        loss = loss + alpha * temperature**2 * kl
    if alpha < 1:
        loss = loss + (1 - alpha) * F.cross_entropy(student, labels, label_smoothing=label_smoothing)
    return loss


def teacher_targets(cfg: DistillConfig, texts: list[str], labels: list[str], *, batch_size: int = 128) -> torch.Tensor:
    """The teacher run's logits ``[len(texts), len(labels)]`` on the training texts, in input order."""
    if cfg.teacher is None:
        raise ConfigError("distill.teacher: no teacher run directory given")
    try:
        run = open_run_dir(cfg.teacher)
        teacher_labels = run.labels()
        model, tokenizer = load_run_classifier(run)
    except TuneforgeError as exc:
        raise ConfigError(f"distill.teacher: {exc}") from None
    if teacher_labels != labels:
        raise ConfigError(
            f"distill.teacher: {cfg.teacher} was trained on labels {teacher_labels[:5]}... but this run has "
            f"{labels[:5]}...; a teacher must have the same labels in the same order"
        )
    saved = yaml.safe_load(run.config_file.read_text(encoding="utf-8")) if run.config_file.exists() else {}
    max_length = int(((saved or {}).get("model") or {}).get("max_length", 128))
    encoded = encode_texts(tokenizer, texts, max_length)
    logits = predict_logits(model, encoded, pad_id=tokenizer.pad_token_id or 0, batch_size=batch_size)
    return torch.from_numpy(logits)
