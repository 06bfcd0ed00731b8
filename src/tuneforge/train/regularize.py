"""Training-time regularizers: R-Drop and adversarial training on the word embeddings (FGM, PGD).

The loop calls one function per micro-batch::

    loss_value = regularized_backward(model, batch, labels, cfg, weight)

It runs the forward pass(es), the loss and the backward pass(es) that ``cfg`` asks for. With
``rdrop_alpha == 0`` and ``adversarial.method == "none"`` it is exactly the plain step: cross-entropy
with label smoothing, ``(loss * weight).backward()``.

- R-Drop (Liang et al. 2021, "R-Drop: Regularized Dropout for Neural Networks"): feed each batch twice;
  dropout makes two different sub-models, and a symmetric KL between their predicted distributions
  makes them agree, on top of the usual cross-entropy of both.
- FGM (Miyato et al. 2017, "Adversarial Training Methods for Semi-Supervised Text Classification"):
  move the word embeddings by ``epsilon`` along the loss gradient (the locally worst direction), and
  train on that perturbed batch as well as the clean one.
- PGD (Madry et al. 2018, "Towards Deep Learning Models Resistant to Adversarial Attacks"): a stronger
  attack, several smaller ascent steps, each projected back into the ``epsilon``-ball around the
  original embeddings.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tuneforge.config import TrainConfig
from tuneforge.train.distill import distillation_loss


@dataclass(frozen=True)
class Teacher:
    """A distillation teacher's logits for the current micro-batch, and how to weigh them."""

    logits: torch.Tensor
    temperature: float
    alpha: float


def task_loss(
    logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float, teacher: Teacher | None = None
) -> torch.Tensor:
    """Cross-entropy with label smoothing, or, with a teacher, the distillation loss."""
    if teacher is None:
        return F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
    return distillation_loss(
        logits,
        teacher.logits,
        labels,
        temperature=teacher.temperature,
        alpha=teacher.alpha,
        label_smoothing=label_smoothing,
    )


def symmetric_kl(logits_a: torch.Tensor, logits_b: torch.Tensor) -> torch.Tensor:
    """½ (KL(p_a ‖ p_b) + KL(p_b ‖ p_a)) of the two softmaxes, summed over classes, mean over examples."""
    log_a = F.log_softmax(logits_a.float(), dim=-1)
    log_b = F.log_softmax(logits_b.float(), dim=-1)
    # kl_div(input=log q, target=log p, log_target=True) is KL(p ‖ q).
    a_to_b = F.kl_div(log_b, log_a, reduction="batchmean", log_target=True)
    b_to_a = F.kl_div(log_a, log_b, reduction="batchmean", log_target=True)
    return 0.5 * (a_to_b + b_to_a)


def _rdrop_terms(
    logits_a: torch.Tensor,
    logits_b: torch.Tensor,
    labels: torch.Tensor,
    label_smoothing: float,
    teacher: Teacher | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    ce = 0.5 * (
        task_loss(logits_a, labels, label_smoothing, teacher) + task_loss(logits_b, labels, label_smoothing, teacher)
    )
    return ce, symmetric_kl(logits_a, logits_b)


def rdrop_loss(
    logits_a: torch.Tensor, logits_b: torch.Tensor, labels: torch.Tensor, *, alpha: float, label_smoothing: float
) -> torch.Tensor:
    """R-Drop loss of two dropout passes over the same batch: mean CE of both + ``alpha`` * symmetric KL.

    ``½ (CE_a + CE_b) + alpha · ½ (KL(p_a ‖ p_b) + KL(p_b ‖ p_a))``, the form of the authors' code, with
    the KL averaged over examples (so ``alpha`` does not depend on the batch size). Label smoothing
    applies to the CE terms only. The paper uses alpha between 0.1 and 1 for BERT-size models on GLUE.
    """
    ce, kl = _rdrop_terms(logits_a, logits_b, labels, label_smoothing)
    return ce + alpha * kl


def embedding_weight(model_or_embedding: torch.nn.Module | torch.Tensor) -> torch.Tensor:
    """The word-embedding matrix of a model (``get_input_embeddings()``), an ``nn.Embedding``, or a tensor."""
    if isinstance(model_or_embedding, torch.Tensor):
        return model_or_embedding
    if isinstance(model_or_embedding, torch.nn.Embedding):
        return model_or_embedding.weight
    if isinstance(model_or_embedding, torch.nn.parallel.DistributedDataParallel):
        model_or_embedding = model_or_embedding.module
    get = getattr(model_or_embedding, "get_input_embeddings", None)
    if get is None:
        raise TypeError(f"cannot find word embeddings in {type(model_or_embedding).__name__}")
    return get().weight


def _unit_step(grad: torch.Tensor, size: float) -> torch.Tensor | None:
    """``size * grad / ‖grad‖`` (Frobenius norm over the whole matrix), or None for a zero/non-finite grad."""
    norm = torch.linalg.vector_norm(grad)
    if not torch.isfinite(norm) or norm == 0:
        return None
    return grad * (size / norm)


class FGM:
    """Fast Gradient Method on the word embeddings (Miyato et al. 2017).

    Usage: after the clean ``loss.backward()``, ``attack()`` adds ``epsilon * g / ‖g‖`` to the embedding
    matrix (``g`` its gradient; only rows of tokens in the batch have one), a second forward/backward
    on the perturbed embeddings accumulates the adversarial gradient, and ``restore()`` puts the exact
    original weights back before ``optimizer.step()``.
    """

    def __init__(self, model_or_embedding: torch.nn.Module | torch.Tensor, epsilon: float) -> None:
        self.weight = embedding_weight(model_or_embedding)
        self.epsilon = epsilon
        self._backup: torch.Tensor | None = None

    @torch.no_grad()
    def attack(self, grad: torch.Tensor | None = None) -> None:
        """Perturb along ``grad`` (default: the weight's ``.grad``); no move for a zero or missing gradient."""
        grad = self.weight.grad if grad is None else grad
        step = None if grad is None else _unit_step(grad, self.epsilon)
        if self._backup is None:
            self._backup = self.weight.detach().clone()
        if step is not None:
            self.weight.add_(step)

    @torch.no_grad()
    def restore(self) -> None:
        """Copy the original weights back (bit-identical); a no-op when not attacking."""
        if self._backup is not None:
            self.weight.copy_(self._backup)
            self._backup = None


class PGD:
    """Projected Gradient Descent (ascent, here) on the word embeddings (Madry et al. 2018).

    ``steps`` times: move ``step_size`` along the current adversarial gradient, then project the total
    perturbation back onto the ball of radius ``epsilon`` (Frobenius norm over the whole matrix) around
    the original embeddings. The first call backs the original up, ``restore()`` copies it back.

    In the standard recipe the model's clean gradients are backed up before the attack, the
    intermediate adversarial passes overwrite them (only their embedding gradient is used, to aim the
    next step), and the backup is restored just before the last adversarial backward, so the step
    uses clean + last-adversarial gradients. :func:`regularized_backward` gets the same result without
    copying any gradient: it computes the intermediate passes' embedding gradients with
    ``torch.autograd.grad``, which leaves every ``.grad`` untouched (and skips the weight gradients).
    """

    def __init__(
        self, model_or_embedding: torch.nn.Module | torch.Tensor, *, epsilon: float, step_size: float, steps: int
    ) -> None:
        self.weight = embedding_weight(model_or_embedding)
        self.epsilon = epsilon
        self.step_size = step_size
        self.steps = steps
        self._backup: torch.Tensor | None = None

    @torch.no_grad()
    def attack(self, grad: torch.Tensor | None = None) -> None:
        """One ascent step along ``grad`` (default: the weight's ``.grad``), projected onto the epsilon-ball."""
        if self._backup is None:
            self._backup = self.weight.detach().clone()
        grad = self.weight.grad if grad is None else grad
        step = None if grad is None else _unit_step(grad, self.step_size)
        if step is None:
            return
        self.weight.add_(step)
        delta = self.weight - self._backup
        norm = torch.linalg.vector_norm(delta)
        if norm > self.epsilon:
            self.weight.copy_(self._backup + delta * (self.epsilon / norm))

    def perturbation(self) -> torch.Tensor:
        """The current perturbation of the embeddings (zeros when not attacking)."""
        if self._backup is None:
            return torch.zeros_like(self.weight)
        return self.weight.detach() - self._backup

    @torch.no_grad()
    def restore(self) -> None:
        """Copy the original weights back (bit-identical); a no-op when not attacking."""
        if self._backup is not None:
            self.weight.copy_(self._backup)
            self._backup = None


def _local(model: torch.nn.Module) -> AbstractContextManager[None]:
    """Under DistributedDataParallel, a pass whose gradients are not exchanged (not the micro-batch's last
    backward, or ``autograd.grad`` that DDP would wait on forever); elsewhere nothing."""
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return model.no_sync()
    return nullcontext()


@contextmanager
def _batch_gradient_of(weight: torch.Tensor) -> Iterator[None]:
    """Inside the block ``weight.grad`` holds only this micro-batch's gradients; the earlier ones are added after.

    With gradient accumulation the embedding gradient already holds earlier micro-batches' gradients;
    aiming the attack with it would spend part of ``epsilon`` on rows this batch does not use. The
    earlier gradient is set aside by reference (no copy). Frozen embeddings (``requires_grad=False``,
    e.g. ``finetune.freeze_embeddings``) get a gradient only inside the block, to aim the attack; it is
    dropped afterwards, so neither the optimizer nor gradient clipping ever sees it.
    """
    frozen = not weight.requires_grad
    earlier = weight.grad
    weight.grad = None
    if frozen:
        weight.requires_grad_(True)
    try:
        yield
    finally:
        if frozen:
            weight.requires_grad_(False)
            weight.grad = earlier
        elif earlier is not None:
            if weight.grad is None:
                weight.grad = earlier
            else:
                weight.grad.add_(earlier)


def _cross_entropy(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    labels: torch.Tensor,
    cfg: TrainConfig,
    teacher: Teacher | None = None,
) -> torch.Tensor:
    return task_loss(model(**batch).logits, labels, cfg.label_smoothing, teacher)


def _clean_loss(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    labels: torch.Tensor,
    cfg: TrainConfig,
    teacher: Teacher | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss to minimise, its cross-entropy part to report)."""
    if cfg.rdrop_alpha > 0:
        # One forward over the batch stacked twice: every row gets its own dropout mask, and one big
        # batch is faster than two small ones.
        doubled = {key: torch.cat([value, value]) for key, value in batch.items()}
        logits_a, logits_b = model(**doubled).logits.chunk(2)
        ce, kl = _rdrop_terms(logits_a, logits_b, labels, cfg.label_smoothing, teacher)
        return ce + cfg.rdrop_alpha * kl, ce
    loss = _cross_entropy(model, batch, labels, cfg, teacher)
    return loss, loss


def regularized_backward(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    labels: torch.Tensor,
    cfg: TrainConfig,
    weight: float | torch.Tensor,
    teacher: Teacher | None = None,
) -> float:
    """Forward, loss and backward of one training micro-batch, with the regularizers ``cfg`` enables.

    ``batch`` is what :func:`tuneforge.data.batching.collate` returns; every backward is scaled by
    ``weight`` (the micro-batch's share of the optimizer step; a tensor when it carries fp16's loss scale).
    ``model`` may be wrapped in DistributedDataParallel: only the last backward exchanges gradients.
    Gradients accumulate into ``.grad`` as with a plain ``backward()``. Returns the clean cross-entropy
    (with label smoothing; for R-Drop, the mean over both passes, without the KL term), so logged losses
    stay comparable across settings.

    - ``rdrop_alpha > 0``: the clean loss is :func:`rdrop_loss` over two dropout passes.
    - ``teacher``: every cross-entropy becomes the distillation loss against the teacher's logits.
    - ``adversarial.method`` fgm/pgd: after the clean backward, one (FGM) or ``steps`` (PGD) passes
      on perturbed word embeddings; the last one's plain cross-entropy (no R-Drop) is back-propagated
      with the same ``weight``, so the step follows clean + adversarial gradients (the usual recipe;
      gradient clipping then bounds the sum). The embeddings are restored before returning.
    """
    adversarial = cfg.adversarial
    if adversarial.method == "none":
        loss, ce = _clean_loss(model, batch, labels, cfg, teacher)
        (loss * weight).backward()
        return ce.item()

    embeddings = embedding_weight(model)
    with _batch_gradient_of(embeddings):
        with _local(model):  # the adversarial backward below exchanges the sum of both
            loss, ce = _clean_loss(model, batch, labels, cfg, teacher)
            (loss * weight).backward()
        if adversarial.method == "fgm":
            fgm = FGM(embeddings, adversarial.epsilon)
            fgm.attack()
            try:
                (_cross_entropy(model, batch, labels, cfg, teacher) * weight).backward()
            finally:
                fgm.restore()
        elif adversarial.method == "pgd":
            pgd = PGD(embeddings, epsilon=adversarial.epsilon, step_size=adversarial.step_size, steps=adversarial.steps)
            grad = embeddings.grad
            try:
                for step in range(adversarial.steps):
                    pgd.attack(grad)
                    if step < adversarial.steps - 1:
                        # Only the direction matters here, so no weight; .grad is left alone.
                        with _local(model):
                            adv_loss = _cross_entropy(model, batch, labels, cfg, teacher)
                            (grad,) = torch.autograd.grad(adv_loss, embeddings)
                    else:
                        (_cross_entropy(model, batch, labels, cfg, teacher) * weight).backward()
            finally:
                pgd.restore()
        else:
            raise ValueError(f"unknown adversarial method {adversarial.method!r}")
    return ce.item()
