"""The exponential moving average of the trainable weights, on a two-parameter model."""

from __future__ import annotations

import pytest
import torch

from tuneforge.train.ema import WeightAverage


def _model() -> torch.nn.Linear:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    model.bias.requires_grad_(False)  # frozen weights are not averaged
    return model


def test_average_follows_the_weights_with_a_warm_up() -> None:
    model = _model()
    start = model.weight.detach().clone()
    average = WeightAverage(model, decay=0.5)
    assert average.names == ["weight"]
    assert average.decay_at(0) == pytest.approx(0.1) and average.decay_at(100) == 0.5

    with torch.no_grad():
        model.weight.add_(1.0)
    average.update(0)  # decay 0.1 at step 0: mostly the new weights
    expected = 0.1 * start + 0.9 * (start + 1.0)
    torch.testing.assert_close(average.state_dict()["weight"], expected)

    with torch.no_grad():
        model.weight.add_(1.0)
    average.update(100)  # the full decay later on
    torch.testing.assert_close(average.state_dict()["weight"], 0.5 * expected + 0.5 * (start + 2.0))


def test_applied_swaps_the_average_in_and_the_live_weights_back() -> None:
    model = _model()
    average = WeightAverage(model, decay=0.9)
    with torch.no_grad():
        model.weight.mul_(3.0)
    live = model.weight.detach().clone()
    average.update(50)
    with average.applied():
        torch.testing.assert_close(model.weight, average.state_dict()["weight"])
        assert not torch.equal(model.weight, live)
    assert torch.equal(model.weight, live)
    with pytest.raises(RuntimeError, match="boom"), average.applied():
        raise RuntimeError("boom")
    assert torch.equal(model.weight, live), "live weights come back even when the block fails"


def test_state_round_trip_and_mismatch() -> None:
    model = _model()
    first = WeightAverage(model, decay=0.9)
    with torch.no_grad():
        model.weight.add_(2.0)
    first.update(20)
    second = WeightAverage(_model(), decay=0.9)
    second.load_state_dict({k: v.clone() for k, v in first.state_dict().items()})
    assert torch.equal(second.state_dict()["weight"], first.state_dict()["weight"])
    with pytest.raises(ValueError, match="does not match the model's trainable weights"):
        second.load_state_dict({"bias": torch.zeros(2)})
    with pytest.raises(ValueError, match="decay must be in"):
        WeightAverage(model, decay=1.0)
