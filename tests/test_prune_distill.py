"""Structured pruning (heads, FFN neurons) and distillation building blocks, on the tiny BERT."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer, BertForSequenceClassification

from tests.conftest import make_rows
from tuneforge.data.batching import collate, encode_texts
from tuneforge.errors import ConfigError
from tuneforge.models.pruned import (
    PRUNED_HEADS_KEY,
    count_parameters,
    encoder_layers,
    ffn_sizes,
    kept_heads,
    restore_pruning,
)
from tuneforge.optimize.distill import make_student, student_layer_indices
from tuneforge.optimize.prune import ffn_importance, head_importance, importance, prune
from tuneforge.train.distill import distillation_loss

torch.set_num_threads(1)
LABELS = ("happy", "sad", "meh")


@pytest.fixture(autouse=True)
def _quiet() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


@pytest.fixture(scope="module")
def data(tiny_model_dir: Path) -> tuple[list[list[int]], list[int], int]:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows = make_rows(48, seed=3)
    encoded = encode_texts(tokenizer, [text for text, _ in rows], 32)
    return encoded, [LABELS.index(label) for _, label in rows], tokenizer.pad_token_id


def classifier(tiny_model_dir: Path, **overrides: object) -> BertForSequenceClassification:
    """The tiny BERT as a 3-class classifier; overrides give a fresh random model of another shape."""
    torch.manual_seed(0)
    if overrides:
        config = AutoConfig.from_pretrained(tiny_model_dir, num_labels=3, **overrides)
        model = AutoModelForSequenceClassification.from_config(config)
    else:
        model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=3)
    return model.eval()


def logits(model: torch.nn.Module, encoded: list[list[int]], pad_id: int) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**collate(encoded, pad_id)).logits


# --- pruning --------------------------------------------------------------------------------------


def test_prune_removes_the_requested_heads_and_neurons(tiny_model_dir: Path, data) -> None:
    encoded, labels, pad_id = data
    model = classifier(tiny_model_dir, num_attention_heads=4)  # 2 layers x 4 heads of 8, FFN 64
    heads, ffn = importance(model, encoded, labels, pad_id=pad_id)
    before = count_parameters(model)
    original = copy.deepcopy(model)
    prune(model, head_fraction=0.25, ffn_fraction=0.5, head_scores=heads, ffn_scores=ffn)

    assert sum(len(k) for k in kept_heads(model)) == 8 - 2
    assert ffn_sizes(model) == [32, 32] and model.config.intermediate_size == 32
    removed = sum(len(v) for v in getattr(model.config, PRUNED_HEADS_KEY).values())
    assert removed == 2
    # Each head: q/k/v rows (3 x (32 x 8 + 8)) and 8 columns of the 32-wide output projection;
    # each FFN neuron: a row + bias of intermediate.dense and a column of output.dense.
    per_head, per_neuron = 3 * (32 * 8 + 8) + 32 * 8, 32 + 1 + 32
    assert count_parameters(model) == before - 2 * per_head - 2 * 32 * per_neuron
    # The lowest-scoring heads and neurons went.
    lowest = sorted((float(heads[i, h]), i, h) for i in range(2) for h in range(4))[:2]
    for _, layer, head in lowest:
        assert head not in kept_heads(model)[layer]
    for layer, old, scores in zip(encoder_layers(model), encoder_layers(original), ffn, strict=True):
        expected = sorted(torch.argsort(scores, descending=True)[:32].tolist())
        assert torch.equal(layer.intermediate.dense.weight, old.intermediate.dense.weight[expected])
        assert torch.equal(layer.output.dense.weight, old.output.dense.weight[:, expected])
    assert logits(model, encoded, pad_id).shape == (len(encoded), 3)


def test_pruned_model_saves_and_loads_with_plain_transformers(tiny_model_dir: Path, data, tmp_path: Path) -> None:
    encoded, labels, pad_id = data
    model = classifier(tiny_model_dir, num_attention_heads=4)
    heads, ffn = importance(model, encoded, labels, pad_id=pad_id)
    prune(model, head_fraction=0.5, ffn_fraction=0.25, head_scores=heads, ffn_scores=ffn)
    expected = logits(model, encoded, pad_id)
    small = count_parameters(model)

    model.save_pretrained(tmp_path / "pruned")
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "pruned")
    assert type(loaded) is BertForSequenceClassification
    assert torch.allclose(logits(loaded, encoded, pad_id), expected, atol=1e-6, rtol=0)
    assert loaded.config.intermediate_size == 48

    # Plain transformers gets the removed heads as zeros; restore_pruning slices them away again.
    assert count_parameters(loaded) > small
    restore_pruning(loaded)
    assert count_parameters(loaded) == small
    assert kept_heads(loaded) == kept_heads(model)
    assert torch.allclose(logits(loaded, encoded, pad_id), expected, atol=1e-6, rtol=0)

    # Pruning a plain-loaded pruned model again first slices the recorded heads away.
    again = AutoModelForSequenceClassification.from_pretrained(tmp_path / "pruned")
    prune(again, head_fraction=0.0, ffn_fraction=0.0, head_scores=None, ffn_scores=None)
    assert kept_heads(again) == kept_heads(model) and count_parameters(again) == small

    # state_dict / load_state_dict (checkpoints) round-trip between pruned models too.
    fresh = restore_pruning(AutoModelForSequenceClassification.from_pretrained(tmp_path / "pruned"))
    with torch.no_grad():
        for p in fresh.parameters():
            p.zero_()
    fresh.load_state_dict(model.state_dict())
    assert torch.equal(logits(fresh, encoded, pad_id), logits(model, encoded, pad_id))


def test_pruning_nothing_changes_nothing(tiny_model_dir: Path, data) -> None:
    encoded, labels, pad_id = data
    model = classifier(tiny_model_dir)
    reference = copy.deepcopy(model)
    heads, ffn = importance(model, encoded, labels, pad_id=pad_id)
    prune(model, head_fraction=0.0, ffn_fraction=0.0, head_scores=heads, ffn_scores=ffn)
    prune(model, head_fraction=0.0, ffn_fraction=0.0, head_scores=None, ffn_scores=None)
    assert not hasattr(model.config, PRUNED_HEADS_KEY)
    assert model.config.intermediate_size == 64
    state, ref = model.state_dict(), reference.state_dict()
    assert state.keys() == ref.keys() and all(torch.equal(state[k], ref[k]) for k in state)
    assert torch.equal(logits(model, encoded, pad_id), logits(reference, encoded, pad_id))


def test_full_pruning_keeps_one_head_per_layer_and_one_neuron(tiny_model_dir: Path, data, tmp_path: Path) -> None:
    encoded, labels, pad_id = data
    model = classifier(tiny_model_dir, num_attention_heads=4)
    heads, ffn = importance(model, encoded, labels, pad_id=pad_id)
    prune(model, head_fraction=1.0, ffn_fraction=1.0, head_scores=heads, ffn_scores=ffn)
    assert [len(k) for k in kept_heads(model)] == [1, 1]
    assert ffn_sizes(model) == [1, 1]
    expected = logits(model, encoded, pad_id)
    model.save_pretrained(tmp_path / "p")
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "p")
    assert torch.allclose(logits(loaded, encoded, pad_id), expected, atol=1e-6, rtol=0)
    # Pruning again keeps the invariant, and importance works on a pruned model.
    heads, ffn = importance(model, encoded, labels, pad_id=pad_id)
    assert heads.shape == (2, 4) and [s.shape for s in ffn] == [torch.Size([1])] * 2
    prune(model, head_fraction=1.0, ffn_fraction=1.0, head_scores=heads, ffn_scores=ffn)
    assert [len(k) for k in kept_heads(model)] == [1, 1]


def test_prune_rejects_bad_arguments(tiny_model_dir: Path) -> None:
    model = classifier(tiny_model_dir)
    with pytest.raises(ValueError, match="head_fraction"):
        prune(model, head_fraction=1.5, ffn_fraction=0.0, head_scores=None, ffn_scores=None)
    with pytest.raises(ValueError, match="head_scores"):
        prune(model, head_fraction=0.5, ffn_fraction=0.0, head_scores=None, ffn_scores=None)
    with pytest.raises(ValueError, match="shape"):
        prune(model, head_fraction=0.5, ffn_fraction=0.0, head_scores=torch.ones(3, 3), ffn_scores=None)


# --- importance -----------------------------------------------------------------------------------


def test_importance_shapes_and_normalisation(tiny_model_dir: Path, data) -> None:
    encoded, labels, pad_id = data
    model = classifier(tiny_model_dir)
    model.train()
    heads = head_importance(model, encoded, labels, pad_id=pad_id, batch_size=16)
    ffn = ffn_importance(model, encoded, labels, pad_id=pad_id, batch_size=16)
    assert model.training  # mode restored
    assert all(p.grad is None for p in model.parameters())  # parameter gradients untouched
    assert heads.shape == (2, 2) and (heads >= 0).all()
    assert torch.allclose(torch.linalg.vector_norm(heads, dim=1), torch.ones(2))
    assert [s.shape for s in ffn] == [torch.Size([64])] * 2
    for scores in ffn:
        assert (scores >= 0).all() and torch.isclose(torch.linalg.vector_norm(scores), torch.tensor(1.0))
    # Other labels, other scores: they come from the loss on this data.
    shifted = [(label + 1) % 3 for label in labels]
    assert not torch.allclose(head_importance(model, encoded, shifted, pad_id=pad_id), heads)


def test_importance_is_the_mask_gradient(tiny_model_dir: Path, data) -> None:
    """One batch: the score is |dL/d mask| (before normalisation), checked by central differences."""
    encoded, labels, pad_id = data
    model = classifier(tiny_model_dir).double()
    batch = collate(encoded, pad_id)
    target = torch.tensor(labels)
    layer = encoder_layers(model)[1]

    def loss_with(head_scale: float, neuron_scale: float) -> float:
        def heads(module, args, output):
            context = output[0].clone()
            context[..., 16:] *= head_scale  # head 1 of 2 (16 wide)
            return (context, *output[1:])

        def neurons(module, args, output):
            output = output.clone()
            output[..., 5] *= neuron_scale
            return output

        handles = [layer.attention.self.register_forward_hook(heads), layer.intermediate.register_forward_hook(neurons)]
        try:
            with torch.no_grad():
                return F.cross_entropy(model(**batch).logits, target).item()
        finally:
            for handle in handles:
                handle.remove()

    eps = 1e-3
    head_grad = abs(loss_with(1 + eps, 1) - loss_with(1 - eps, 1)) / (2 * eps)
    neuron_grad = abs(loss_with(1, 1 + eps) - loss_with(1, 1 - eps)) / (2 * eps)
    heads, ffn = importance(model, encoded, labels, pad_id=pad_id, batch_size=len(encoded))
    raw_heads, raw_ffn = _unnormalised(model, encoded, labels, pad_id)
    assert torch.allclose(heads[1], raw_heads[1] / torch.linalg.vector_norm(raw_heads[1]), rtol=1e-4)
    assert raw_heads[1, 1].item() == pytest.approx(head_grad, rel=1e-4)
    assert raw_ffn[1][5].item() == pytest.approx(neuron_grad, rel=1e-4)
    assert torch.allclose(ffn[1], raw_ffn[1] / torch.linalg.vector_norm(raw_ffn[1]), rtol=1e-4)


def _unnormalised(model, encoded, labels, pad_id):
    """Raw |dL/dmask| of one full batch, through the same hooks importance() installs."""
    from tuneforge.optimize import prune as prune_module

    layers = encoder_layers(model)
    head_masks = [torch.ones(2, dtype=torch.float64, requires_grad=True) for _ in layers]
    ffn_masks = [torch.ones(64, dtype=torch.float64, requires_grad=True) for _ in layers]
    handles = []
    for layer, hm, fm in zip(layers, head_masks, ffn_masks, strict=True):
        handles.append(layer.attention.self.register_forward_hook(prune_module._head_mask_hook(hm)))
        handles.append(layer.intermediate.register_forward_hook(prune_module._neuron_mask_hook(fm)))
    try:
        loss = F.cross_entropy(model(**collate(encoded, pad_id)).logits, torch.tensor(labels))
        grads = torch.autograd.grad(loss, head_masks + ffn_masks)
    finally:
        for handle in handles:
            handle.remove()
    return torch.stack([g.abs() for g in grads[:2]]).float(), [g.abs().float() for g in grads[2:]]


def test_importance_finds_units_that_do_nothing(tiny_model_dir: Path, data) -> None:
    """Heads and neurons whose output is cut off score 0, so pruning by importance removes exactly them
    and leaves the logits as they were, while pruning the most important units changes them."""
    encoded, labels, pad_id = data
    model = classifier(tiny_model_dir, num_attention_heads=4)
    dead_heads = {0: [2], 1: [0]}
    with torch.no_grad():
        for index, layer in enumerate(encoder_layers(model)):
            for head in dead_heads[index]:
                layer.attention.output.dense.weight[:, head * 8 : (head + 1) * 8] = 0
            layer.output.dense.weight[:, 32:] = 0  # neurons 32..63 feed nothing
    expected = logits(model, encoded, pad_id)
    heads, ffn = importance(model, encoded, labels, pad_id=pad_id)
    assert heads[0, 2] == 0 and heads[1, 0] == 0 and (heads > 0).sum() == 6
    assert all((s[32:] == 0).all() and (s[:32] > 0).all() for s in ffn)

    worst = copy.deepcopy(model)
    prune(model, head_fraction=0.25, ffn_fraction=0.5, head_scores=heads, ffn_scores=ffn)
    assert kept_heads(model) == [[0, 1, 3], [1, 2, 3]]
    assert torch.allclose(logits(model, encoded, pad_id), expected, atol=1e-6, rtol=0)
    prune(worst, head_fraction=0.25, ffn_fraction=0.5, head_scores=-heads, ffn_scores=[-s for s in ffn])
    # (A freshly initialised BERT's encoder moves the logits little: std 0.02 weights.)
    assert (logits(worst, encoded, pad_id) - expected).abs().max() > 1e-5


# --- distillation ---------------------------------------------------------------------------------


def test_student_layer_indices() -> None:
    assert student_layer_indices(6, 3) == [1, 3, 5]
    assert student_layer_indices(12, 6) == [1, 3, 5, 7, 9, 11]
    assert student_layer_indices(6, 2) == [2, 5]
    assert student_layer_indices(6, 6) == list(range(6))
    assert student_layer_indices(6, 1) == [5]
    assert student_layer_indices(6, 2, "first") == [0, 1]
    assert student_layer_indices(6, 2, "last") == [4, 5]
    assert student_layer_indices(6, 2, [0, 4]) == [0, 4]
    for bad in ([4, 0], [0, 6], [1]):
        with pytest.raises(ConfigError):
            student_layer_indices(6, 2, bad)
    with pytest.raises(ConfigError, match="between 1 and 6"):
        student_layer_indices(6, 7)
    with pytest.raises(ConfigError, match="unknown layer map"):
        student_layer_indices(6, 2, "random")


def test_make_student_copies_the_chosen_layers(tiny_model_dir: Path, data, tmp_path: Path) -> None:
    encoded, _, pad_id = data
    teacher = classifier(tiny_model_dir, num_hidden_layers=6)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = make_student(teacher, 3)
    assert len(encoder_layers(student)) == 3 and student.config.num_hidden_layers == 3
    assert teacher.config.num_hidden_layers == 6 and len(encoder_layers(teacher)) == 6
    assert student.config.tuneforge_teacher_layers == [1, 3, 5]
    t_state, s_state = teacher.state_dict(), student.state_dict()
    for s_index, t_index in enumerate([1, 3, 5]):
        prefix_s, prefix_t = f"bert.encoder.layer.{s_index}.", f"bert.encoder.layer.{t_index}."
        keys = [k for k in s_state if k.startswith(prefix_s)]
        assert keys
        for key in keys:
            assert torch.equal(s_state[key], t_state[prefix_t + key[len(prefix_s) :]])
    for key in s_state:
        if not key.startswith("bert.encoder."):
            assert torch.equal(s_state[key], t_state[key])  # embeddings, pooler, classifier
    assert all(torch.equal(before[k], t_state[k]) for k in before)  # teacher untouched
    # The student is a separate copy.
    with torch.no_grad():
        student.classifier.weight.add_(1.0)
    assert torch.equal(teacher.classifier.weight, before["classifier.weight"])

    student.save_pretrained(tmp_path / "student")
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "student")
    assert loaded.config.num_hidden_layers == 3
    assert torch.equal(logits(loaded, encoded, pad_id), logits(student, encoded, pad_id))
    assert len(student(**collate(encoded[:4], pad_id), output_hidden_states=True).hidden_states) == 4


def test_make_student_of_a_pruned_teacher(tiny_model_dir: Path, data, tmp_path: Path) -> None:
    encoded, _, pad_id = data
    teacher = classifier(tiny_model_dir, num_hidden_layers=4, num_attention_heads=4)
    heads = torch.arange(16, dtype=torch.float).view(4, 4)  # removes layer 0's heads first
    prune(teacher, head_fraction=0.25, ffn_fraction=0.0, head_scores=heads, ffn_scores=None)
    assert getattr(teacher.config, PRUNED_HEADS_KEY) == {"0": [0, 1, 2], "1": [0]}
    student = make_student(teacher, 2, layer_map=[0, 3])
    assert getattr(student.config, PRUNED_HEADS_KEY) == {"0": [0, 1, 2]}
    assert kept_heads(student) == [[3], [0, 1, 2, 3]]
    student.save_pretrained(tmp_path / "s")
    loaded = restore_pruning(AutoModelForSequenceClassification.from_pretrained(tmp_path / "s"))
    assert kept_heads(loaded) == kept_heads(student)
    assert torch.allclose(logits(loaded, encoded, pad_id), logits(student, encoded, pad_id), atol=1e-6, rtol=0)


def test_distillation_loss() -> None:
    torch.manual_seed(0)
    student = torch.randn(8, 3, requires_grad=True)
    teacher = torch.randn(8, 3, requires_grad=True)
    labels = torch.randint(0, 3, (8,))

    ce = F.cross_entropy(student, labels, label_smoothing=0.1)
    assert torch.allclose(
        distillation_loss(student, teacher, labels, temperature=2.0, alpha=0.0, label_smoothing=0.1), ce
    )
    same = distillation_loss(student, student.detach().clone(), labels, temperature=3.0, alpha=1.0)
    assert same.abs().item() < 1e-6
    assert distillation_loss(student, teacher, labels, temperature=3.0, alpha=1.0).item() > 0

    t = 2.0
    p_teacher = F.softmax(teacher / t, dim=-1)
    kl = (p_teacher * (p_teacher.log() - F.log_softmax(student / t, dim=-1))).sum(-1).mean()
    expected = 0.3 * t * t * kl + 0.7 * F.cross_entropy(student, labels)
    loss = distillation_loss(student, teacher, labels, temperature=t, alpha=0.3)
    assert torch.allclose(loss, expected)
    loss.backward()
    assert student.grad is not None and teacher.grad is None  # the teacher is fixed

    with pytest.raises(ValueError, match="differ"):
        distillation_loss(student, teacher[:, :2], labels, temperature=1.0, alpha=0.5)
