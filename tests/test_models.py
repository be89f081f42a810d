"""Every registered model builds, runs, and has the parameter count of its reading of the seed."""

import pytest
import torch

from toolkit.errors import ToolkitError
from toolkit.models import MODELS, ResNetV2, count_params, create_model

# The counts our readings of the write-ups produce (see toolkit/models.py for each reading).
EXPECTED = {
    "mnist_opt": 6_132,
    "mnist_gap": 7_974,
    "cifar_ft1": 177_294,
    "cifar_ft2": 180_022,
    "cifar_ft3": 144_374,
    "cifar_ft5": 144_374,
    "cifar_ft6": 144_374,
    "resnet20": 270_410,
    "resnet20_dropout": 270_410,
    "resnet20_dense": 274_698,
    "resnet44v2": 2_647_684,
}


def test_every_registered_model_has_an_expected_count():
    assert set(EXPECTED) == set(MODELS)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_parameter_count(name):
    entry = MODELS[name]
    params = count_params(entry.build())
    assert params == EXPECTED[name]
    if entry.exact:
        # the write-up pins every layer: the count must be the documented one
        assert params == entry.documented_params
    elif name != "resnet44v2":
        # FT family: within 1% of the documented count
        assert abs(params - entry.documented_params) / entry.documented_params <= 0.01


def test_resnet44v2_readings():
    # "~2.7M": the three-stage ResNet-44 is 2.65M (-1.9%); the literal four-stage listing is 5.94M.
    assert abs(count_params(create_model("resnet44v2")) - 2_700_000) / 2_700_000 < 0.02
    assert count_params(ResNetV2(stages=(7, 7, 7, 3), widths=(32, 64, 128, 256))) == 5_940_356


@pytest.mark.parametrize("name", sorted(MODELS))
def test_forward_shape(name):
    model = create_model(name).eval()
    shape = (3, MODELS[name].channels, 28, 28) if MODELS[name].channels == 1 else (3, 3, 32, 32)
    with torch.no_grad():
        out = model(torch.randn(shape))
    assert out.shape == (3, 100 if name == "resnet44v2" else 10)
    assert torch.isfinite(out).all()


def test_seed_architecture_details():
    # ResNet20 keeps the Keras conv biases: the stem is 448 params (3*16*9 + 16) as in the table
    stem = create_model("resnet20").stem[0]
    assert stem.bias is not None and sum(p.numel() for p in stem.parameters()) == 448
    # FT-5 dilates block 3's plain convs, FT-3 does not; the pooling convs use 9, 5, 3
    ft3, ft5 = create_model("cifar_ft3"), create_model("cifar_ft5")
    dil3 = sorted({m.dilation[0] for m in ft3.modules() if isinstance(m, torch.nn.Conv2d)})
    dil5 = sorted({m.dilation[0] for m in ft5.modules() if isinstance(m, torch.nn.Conv2d)})
    assert dil3 == [1, 3, 5, 9] and dil5 == [1, 2, 3, 5, 9]
    # FT-6 moves dropout: Dropout2d only after the 3 pooling convs, plus one Dropout in the head
    ft6 = create_model("cifar_ft6")
    assert sum(isinstance(m, torch.nn.Dropout2d) for m in ft6.modules()) == 3
    assert sum(type(m) is torch.nn.Dropout for m in ft6.classifier) == 1


def test_unknown_model_and_option_are_errors():
    with pytest.raises(ToolkitError, match="unknown model 'nope'"):
        create_model("nope")
    with pytest.raises(ToolkitError, match="no option 'widht'"):
        create_model("mnist_gap", widht=3)


@pytest.mark.parametrize("name", ["mnist_opt", "mnist_gap"])
def test_both_padding_readings_keep_the_documented_count(name):
    counts = {p: count_params(create_model(name, early_padding=p)) for p in (0, 1)}
    assert counts == {0: MODELS[name].documented_params, 1: MODELS[name].documented_params}
    with pytest.raises(ToolkitError, match="early_padding must be 0 or 1"):
        create_model(name, early_padding=2)
