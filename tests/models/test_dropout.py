"""The toolkit's CPU dropout: torch's distribution and arithmetic, a cheaper generator, torch's seeding."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from toolkit.models.blocks import Dropout
from toolkit.models.registry import MODELS, create_model


def test_masks_keep_1_minus_p_and_scale_exactly_as_torch_does():
    torch.manual_seed(0)
    x = torch.rand(64, 12, 28, 28) + 0.5  # no zeros: a zero in the output is a dropped element
    drop = Dropout(0.05).train()
    out = drop(x)
    kept = out != 0
    n = kept.numel()
    assert abs(kept.float().mean().item() - 0.95) < 4 * (0.05 * 0.95 / n) ** 0.5  # binomial, 4 standard deviations
    assert torch.equal(out[kept], x[kept] * (1 / 0.95))  # the products F.dropout makes
    reference = nn.functional.dropout(x, 0.05, True)  # torch's own: the same values where it keeps
    assert torch.equal(reference[reference != 0], x[reference != 0] * (1 / 0.95))
    # elements are independent: neighbours' keep decisions do not agree more than chance
    flat = kept.flatten().float()
    agree = (flat[1:] == flat[:-1]).float().mean().item()
    assert abs(agree - (0.95**2 + 0.05**2)) < 0.002


def test_the_gradient_is_the_mask_times_the_scale():
    torch.manual_seed(1)
    x = (torch.rand(8, 10, 14, 14) + 0.5).requires_grad_()
    out = Dropout(0.3).train()(x)
    grad = torch.randn_like(out)
    out.backward(grad)
    assert torch.equal(x.grad, grad * (out != 0).float() * (1 / 0.7))


def test_torchs_seed_and_saved_state_decide_the_masks():
    x = torch.ones(4, 12, 28, 28)
    drop = Dropout(0.1).train()
    torch.manual_seed(3)
    a = drop(x)
    torch.manual_seed(3)
    assert torch.equal(drop(x), a)  # torch.manual_seed reproduces a run
    state = torch.get_rng_state()
    b = drop(x)
    assert not torch.equal(a, b)  # successive calls draw new masks
    torch.set_rng_state(state)
    assert torch.equal(drop(x), b)  # a resumed run (the saved torch state) continues with the same masks


@pytest.mark.parametrize("p", [0.0, 1.0])
def test_edge_probabilities_and_evaluation_are_torchs(p):
    x = torch.rand(2, 3, 4, 4)
    assert torch.equal(Dropout(p).train()(x), nn.functional.dropout(x, p, True))
    assert torch.equal(Dropout(0.5).eval()(x), x)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_model_family_uses_it_for_element_dropout(name):
    model = create_model(name)
    plain = [m for m in model.modules() if type(m) is nn.Dropout]
    assert not plain, f"{name} has torch's nn.Dropout: {plain}"


def test_the_benchmarks_can_put_torchs_dropout_back():
    from toolkit.models.blocks import with_torch_dropout

    model = create_model("mnist_gap", dropout=0.05)
    assert with_torch_dropout(model) == 6  # after every conv block but the first
    assert [type(m) for m in model.modules() if isinstance(m, nn.Dropout)] == [nn.Dropout] * 6
