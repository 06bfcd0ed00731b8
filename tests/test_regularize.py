"""R-Drop, FGM, PGD and the per-micro-batch backward the loop calls, on the tiny random BERT."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from tests.conftest import make_rows
from tuneforge.config import TrainConfig
from tuneforge.data.batching import collate, encode_texts
from tuneforge.train.regularize import FGM, PGD, rdrop_loss, regularized_backward


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


@pytest.fixture()
def model(tiny_model_dir: Path) -> torch.nn.Module:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=3)


@pytest.fixture(scope="module")
def batches(tiny_model_dir: Path) -> list[tuple[dict[str, torch.Tensor], torch.Tensor]]:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows = make_rows(24, seed=3)
    ids = encode_texts(tokenizer, [text for text, _ in rows], 32)
    names = ["happy", "meh", "sad"]
    labels = torch.tensor([names.index(label) for _, label in rows])
    return [(collate(ids[i : i + 8], tokenizer.pad_token_id), labels[i : i + 8]) for i in range(0, 24, 8)]


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor | None]:
    return {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}


def _cfg(**kwargs: object) -> TrainConfig:
    return TrainConfig(label_smoothing=0.1, **kwargs)


def _embeddings(model: torch.nn.Module) -> torch.nn.Parameter:
    return model.get_input_embeddings().weight


def _clean_backward(model: torch.nn.Module, batch: dict, labels: torch.Tensor) -> torch.Tensor:
    loss = F.cross_entropy(model(**batch).logits, labels, label_smoothing=0.1)
    loss.backward()
    return loss


# --- R-Drop -----------------------------------------------------------------------------------------


def test_rdrop_equals_cross_entropy_when_both_passes_agree() -> None:
    torch.manual_seed(1)
    logits, labels = torch.randn(6, 4), torch.tensor([0, 1, 2, 3, 0, 1])
    plain = F.cross_entropy(logits, labels, label_smoothing=0.1)
    assert torch.allclose(rdrop_loss(logits, logits.clone(), labels, alpha=5.0, label_smoothing=0.1), plain)


def test_rdrop_kl_term_is_positive_symmetric_and_scales_with_alpha() -> None:
    torch.manual_seed(2)
    a, b, labels = torch.randn(6, 4), torch.randn(6, 4), torch.tensor([0, 1, 2, 3, 0, 1])
    ce = 0.5 * (F.cross_entropy(a, labels) + F.cross_entropy(b, labels))
    losses = [rdrop_loss(a, b, labels, alpha=alpha, label_smoothing=0.0) for alpha in (0.0, 0.5, 1.0, 4.0)]
    assert torch.allclose(losses[0], ce)
    assert losses[0] < losses[1] < losses[2] < losses[3]
    kl = losses[2] - losses[0]
    assert torch.allclose(losses[3] - losses[0], 4 * kl, rtol=1e-5)
    assert torch.allclose(rdrop_loss(b, a, labels, alpha=1.0, label_smoothing=0.0), losses[2])


def test_two_dropout_passes_of_the_model_differ(model: torch.nn.Module, batches: list) -> None:
    batch, labels = batches[0]
    model.train()
    first, second = model(**batch).logits, model(**batch).logits
    assert not torch.allclose(first, second)
    assert rdrop_loss(first, second, labels, alpha=1.0, label_smoothing=0.1) > rdrop_loss(
        first, second, labels, alpha=0.0, label_smoothing=0.1
    )
    model.eval()
    assert torch.equal(model(**batch).logits, model(**batch).logits)


# --- FGM / PGD --------------------------------------------------------------------------------------


def test_fgm_moves_the_used_rows_by_epsilon_and_restores_them_exactly(model: torch.nn.Module, batches: list) -> None:
    batch, labels = batches[0]
    model.eval()
    weight = _embeddings(model)
    original = weight.detach().clone()
    clean = _clean_backward(model, batch, labels)

    fgm = FGM(model, epsilon=1.0)
    fgm.attack()
    delta = weight.detach() - original
    assert torch.linalg.vector_norm(delta).item() == pytest.approx(1.0, rel=1e-4)
    used = torch.zeros(weight.shape[0], dtype=torch.bool)
    used[batch["input_ids"].unique()] = True
    used[0] = False  # [PAD] is BERT's padding_idx: it never gets a gradient
    assert (delta[used].abs().sum(dim=1) > 0).all()
    assert torch.equal(delta[~used], torch.zeros_like(delta[~used]))
    with torch.no_grad():
        adversarial = F.cross_entropy(model(**batch).logits, labels, label_smoothing=0.1)
    assert adversarial > clean  # the gradient direction is the locally worst one

    fgm.restore()
    assert torch.equal(weight, original)
    fgm.restore()  # idempotent
    assert torch.equal(weight, original)


def test_fgm_without_a_gradient_does_not_move(model: torch.nn.Module) -> None:
    original = _embeddings(model).detach().clone()
    fgm = FGM(model.get_input_embeddings(), epsilon=1.0)
    fgm.attack()
    assert torch.equal(_embeddings(model), original)
    fgm.restore()


def test_pgd_stays_in_the_epsilon_ball_and_restores_exactly(model: torch.nn.Module, batches: list) -> None:
    batch, labels = batches[0]
    model.eval()
    weight = _embeddings(model)
    original = weight.detach().clone()
    _clean_backward(model, batch, labels)

    pgd = PGD(model, epsilon=0.5, step_size=0.3, steps=4)
    norms = []
    grad = weight.grad
    for _ in range(pgd.steps):
        pgd.attack(grad)
        norms.append(torch.linalg.vector_norm(weight.detach() - original).item())
        assert torch.allclose(pgd.perturbation(), weight.detach() - original)
        loss = F.cross_entropy(model(**batch).logits, labels)
        (grad,) = torch.autograd.grad(loss, weight)
    assert norms[0] == pytest.approx(0.3, rel=1e-4)
    assert all(n <= 0.5 + 1e-5 for n in norms)
    assert max(norms) == pytest.approx(0.5, rel=1e-4)  # 4 steps of 0.3 would leave the ball: projected onto it
    pgd.restore()
    assert torch.equal(weight, original)


def _standard_pgd_recipe(model: torch.nn.Module, batch: dict, labels: torch.Tensor, eps: float, alpha: float, k: int):
    """The widely copied recipe: back up all gradients, k attacks, restore them before the last backward."""
    weight = _embeddings(model)
    _clean_backward(model, batch, labels)
    backup = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    original = weight.detach().clone()
    for t in range(k):
        with torch.no_grad():
            weight.add_(alpha * weight.grad / torch.linalg.vector_norm(weight.grad))
            delta = weight - original
            if torch.linalg.vector_norm(delta) > eps:
                weight.copy_(original + eps * delta / torch.linalg.vector_norm(delta))
        if t != k - 1:
            model.zero_grad()
        else:
            for n, p in model.named_parameters():
                p.grad = backup[n]
        F.cross_entropy(model(**batch).logits, labels, label_smoothing=0.1).backward()
    with torch.no_grad():
        weight.copy_(original)


def test_pgd_step_keeps_clean_plus_last_adversarial_gradients(model: torch.nn.Module, batches: list) -> None:
    batch, labels = batches[0]
    model.eval()
    original = _embeddings(model).detach().clone()
    _standard_pgd_recipe(model, batch, labels, eps=0.5, alpha=0.3, k=3)
    expected = _grads(model)
    model.zero_grad(set_to_none=True)

    cfg = _cfg(adversarial={"method": "pgd", "epsilon": 0.5, "step_size": 0.3, "steps": 3})
    regularized_backward(model, batch, labels, cfg, 1.0)
    assert torch.equal(_embeddings(model), original)
    for name, grad in _grads(model).items():
        assert grad is not None and expected[name] is not None, name
        assert torch.allclose(grad, expected[name], atol=1e-6, rtol=1e-4), name


# --- regularized_backward ---------------------------------------------------------------------------


def test_everything_off_is_exactly_the_plain_step(model: torch.nn.Module, batches: list) -> None:
    model.train()  # dropout on: the same seed must give the same masks
    cfg = _cfg()
    plain_losses = []
    torch.manual_seed(7)
    for batch, labels in batches:
        loss = F.cross_entropy(model(**batch).logits, labels, label_smoothing=cfg.label_smoothing)
        (loss * (len(labels) / 24)).backward()
        plain_losses.append(loss.item())
    expected = _grads(model)
    model.zero_grad(set_to_none=True)

    torch.manual_seed(7)
    losses = [regularized_backward(model, batch, labels, cfg, len(labels) / 24) for batch, labels in batches]
    assert losses == plain_losses
    for name, grad in _grads(model).items():
        assert torch.equal(grad, expected[name]), name


def test_rdrop_backward_is_the_rdrop_loss_and_reports_the_cross_entropy(model: torch.nn.Module, batches: list) -> None:
    batch, labels = batches[0]
    model.train()
    torch.manual_seed(3)
    doubled = {k: torch.cat([v, v]) for k, v in batch.items()}
    a, b = model(**doubled).logits.chunk(2)
    (rdrop_loss(a, b, labels, alpha=2.0, label_smoothing=0.1) * 0.5).backward()
    expected = _grads(model)
    ce = 0.5 * (F.cross_entropy(a, labels, label_smoothing=0.1) + F.cross_entropy(b, labels, label_smoothing=0.1))
    model.zero_grad(set_to_none=True)

    torch.manual_seed(3)
    reported = regularized_backward(model, batch, labels, _cfg(rdrop_alpha=2.0), 0.5)
    assert reported == pytest.approx(ce.item())
    for name, grad in _grads(model).items():
        assert torch.equal(grad, expected[name]), name


def test_fgm_backward_accumulates_like_separate_micro_batches(model: torch.nn.Module, batches: list) -> None:
    """Earlier micro-batches' embedding gradients must not aim (nor dilute) this batch's attack."""
    model.eval()
    cfg = _cfg(adversarial={"method": "fgm", "epsilon": 1.0})
    original = _embeddings(model).detach().clone()
    separate = []
    for batch, labels in batches[:2]:
        model.zero_grad(set_to_none=True)
        regularized_backward(model, batch, labels, cfg, 0.5)
        separate.append(_grads(model))
    model.zero_grad(set_to_none=True)
    for batch, labels in batches[:2]:
        regularized_backward(model, batch, labels, cfg, 0.5)
    assert torch.equal(_embeddings(model), original)
    for name, grad in _grads(model).items():
        assert torch.allclose(grad, separate[0][name] + separate[1][name], atol=1e-6), name

    model.zero_grad(set_to_none=True)
    _clean_backward(model, *batches[0])
    clean = _grads(model)
    # The adversarial pass adds a second, different gradient.
    assert not torch.allclose(separate[0]["classifier.weight"], 0.5 * clean["classifier.weight"])


def test_adversarial_training_works_with_frozen_embeddings(model: torch.nn.Module, batches: list) -> None:
    batch, labels = batches[0]
    model.eval()
    weight = _embeddings(model)
    weight.requires_grad_(False)
    original = weight.detach().clone()
    _clean_backward(model, batch, labels)
    clean = _grads(model)
    model.zero_grad(set_to_none=True)
    for method in ("fgm", "pgd"):
        regularized_backward(model, batch, labels, _cfg(adversarial={"method": method}), 1.0)
        assert weight.grad is None and not weight.requires_grad
        assert torch.equal(weight, original)
        assert not torch.allclose(model.classifier.weight.grad, clean["classifier.weight"])
        model.zero_grad(set_to_none=True)
