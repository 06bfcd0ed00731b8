"""An exponential moving average (EMA) of the trainable weights.

The last weights of a run carry the noise of its last few hundred batches; their running average sits
nearer the middle of the basin the run has settled in, which usually generalises a little better and,
more usefully here, varies less from seed to seed. Training updates the live weights as usual;
evaluation and the saved model use the average (``applied``).

The average is kept in float32 beside the live weights (one more copy of what trains) and is part of
the checkpoint, so a resumed run averages exactly as an uninterrupted one. (torch's
``swa_utils.AveragedModel`` would copy the whole model, frozen weights included, and has no warm-up;
swapping the average into the live model keeps every evaluation and save path unchanged.)
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


class WeightAverage:
    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"decay must be in (0, 1), got {decay}")
        self.decay = decay
        trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        self.names = [name for name, _ in trainable]
        self._params = [p for _, p in trainable]
        self.shadow = [p.detach().clone() for p in self._params]

    def decay_at(self, step: int) -> float:
        """Early on the average would remember the pretrained start for too long: let it catch up."""
        return min(self.decay, (1 + step) / (10 + step))

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Fold in the weights after optimizer step ``step`` (0-based)."""
        torch._foreach_lerp_(self.shadow, self._params, 1.0 - self.decay_at(step))

    @contextmanager
    def applied(self) -> Iterator[None]:
        """Swap the averaged weights into the model for the block, then put the live ones back."""
        with torch.no_grad():
            live = [p.detach().clone() for p in self._params]
            torch._foreach_copy_(self._params, self.shadow)
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_(self._params, live)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(zip(self.names, self.shadow, strict=True))

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        if sorted(tensors) != sorted(self.names):
            raise ValueError("the checkpoint's weight average does not match the model's trainable weights")
        with torch.no_grad():
            for shadow, name in zip(self.shadow, self.names, strict=True):
                shadow.copy_(tensors[name])
