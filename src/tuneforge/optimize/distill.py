"""Distillation students: a shallower copy of a classifier, initialised from the teacher's own layers.

:func:`make_student` copies a BERT-family classifier keeping ``num_layers`` of its encoder layers
(embeddings, pooler and classifier included), the initialisation of DistilBERT (Sanh et al. 2019,
which took every other layer) generalised to any depth. The student is then trained with
``distill.teacher`` set (see ``tuneforge.train.distill`` for the loss).
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Sequence

from torch import nn
from transformers import PreTrainedModel

from tuneforge.errors import ConfigError
from tuneforge.models.pruned import PRUNED_HEADS_KEY, encoder_layers

TEACHER_LAYERS_KEY = "tuneforge_teacher_layers"
LAYER_MAPS = ("uniform", "first", "last")


def student_layer_indices(
    num_teacher_layers: int, num_layers: int, layer_map: str | Sequence[int] = "uniform"
) -> list[int]:
    """Which teacher layers (0-based, increasing) initialise the student's ``num_layers`` layers.

    - ``uniform``: evenly spaced and always ending with the teacher's last layer,
      ``floor((i + 1) · L / k) − 1``: 6 → 3 takes 1, 3, 5; 12 → 6 takes 1, 3, 5, 7, 9, 11; 6 → 2 takes 2, 5.
    - ``first``: the bottom ``k`` layers; ``last``: the top ``k`` layers.
    - an explicit list of distinct, increasing teacher layer indices.
    """
    if not 1 <= num_layers <= num_teacher_layers:
        raise ConfigError(f"distill: the student needs between 1 and {num_teacher_layers} layers, got {num_layers}")
    if isinstance(layer_map, str):
        if layer_map == "uniform":
            return [(i + 1) * num_teacher_layers // num_layers - 1 for i in range(num_layers)]
        if layer_map == "first":
            return list(range(num_layers))
        if layer_map == "last":
            return list(range(num_teacher_layers - num_layers, num_teacher_layers))
        raise ConfigError(f"distill: unknown layer map {layer_map!r} (allowed: {', '.join(LAYER_MAPS)}, or a list)")
    chosen = [int(i) for i in layer_map]
    if len(chosen) != num_layers or any(b <= a for a, b in itertools.pairwise(chosen)):
        raise ConfigError(f"distill: layer map {chosen} must list {num_layers} increasing teacher layers")
    if chosen[0] < 0 or chosen[-1] >= num_teacher_layers:
        raise ConfigError(f"distill: layer map {chosen} is outside the teacher's {num_teacher_layers} layers")
    return chosen


def make_student(
    teacher: PreTrainedModel, num_layers: int, *, layer_map: str | Sequence[int] = "uniform"
) -> PreTrainedModel:
    """A copy of ``teacher`` with only ``num_layers`` encoder layers, initialised from the teacher's.

    The embeddings, pooler and classification head are copied unchanged; ``config.num_hidden_layers``
    is updated (and the chosen teacher layers are recorded as ``config.tuneforge_teacher_layers``), so
    the student saves and loads as a plain model of the same architecture. The teacher is not modified.
    """
    layers = encoder_layers(teacher)
    chosen = student_layer_indices(len(layers), num_layers, layer_map)
    student = copy.deepcopy(teacher)
    encoder = student.base_model.encoder
    encoder.layer = nn.ModuleList([encoder.layer[i] for i in chosen])
    for new_index, layer in enumerate(encoder.layer):
        # transformers 5 layers carry their own index (for caches); keep them consistent.
        for module in layer.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = new_index
    config = student.config
    config.num_hidden_layers = num_layers
    if getattr(config, "layer_types", None) is not None and len(config.layer_types) == len(layers):
        config.layer_types = [config.layer_types[i] for i in chosen]
    pruned = getattr(config, PRUNED_HEADS_KEY, None)
    if pruned:
        remapped = {str(new): pruned[str(old)] for new, old in enumerate(chosen) if str(old) in pruned}
        if remapped:
            setattr(config, PRUNED_HEADS_KEY, remapped)
        else:
            delattr(config, PRUNED_HEADS_KEY)
    previous = getattr(config, TEACHER_LAYERS_KEY, None)
    setattr(config, TEACHER_LAYERS_KEY, [previous[i] for i in chosen] if previous else chosen)
    student.train(teacher.training)
    return student
