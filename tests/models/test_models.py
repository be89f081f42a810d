"""Every registered model builds, runs, and has the parameter count of its reading of the seed."""

import pytest
import torch

from toolkit.core.errors import ToolkitError
from toolkit.models.blocks import Dropout
from toolkit.models.registry import MODELS, count_params, create_model

# The counts our readings of the write-ups produce (see toolkit/models/registry.py for each reading).
EXPECTED = {
    "mnist_opt": 6_132,
    "mnist_gap": 7_974,
    "cifar_ft1": 177_302,
    "cifar_ft2": 179_318,
    "cifar_ft3": 144_426,
    "cifar_ft5": 144_426,
    "cifar_ft6": 144_426,
    "resnet20": 270_410,
    "resnet20_dropout": 270_410,
    "resnet20_dense": 274_698,
    "resnet44v2": 5_941_316,
    "resnet44v2_3stage": 2_647_684,
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
    else:
        # FT family: within 1% of the documented count
        assert abs(params - entry.documented_params) / entry.documented_params <= 0.01


def test_resnet44v2_is_the_sources_network():
    """Seed 004's code (erkarthi17/ERA, Week_8_RESNET_CIFAR_from_Scratch/model.py), counted part by part."""
    model = create_model("resnet44v2")
    assert count_params(model) == 5_941_316
    blocks = list(model.blocks)
    assert [len(blocks)] == [7 + 7 + 7 + 3]
    stages = [blocks[0:7], blocks[7:14], blocks[14:21], blocks[21:24]]
    assert [sum(count_params(b) for b in s) for s in stages] == [129_920, 501_568, 2_002_560, 3_280_128]
    # the stem is conv -> BN -> ReLU (928 = 3*32*9 + 2*32), the head BN -> ... -> Linear(256, 100)
    assert count_params(model.stem) == 928 and count_params(model.head) == 2 * 256 + 256 * 100 + 100
    assert [type(m).__name__ for m in model.stem] == ["Conv2d", "BatchNorm2d", "ReLU"]
    # projections are 1x1 conv -> BN (32*64 + 2*64 = 2,176 in stage 2's first block)
    first = stages[1][0]
    assert [type(m).__name__ for m in first.shortcut] == ["Conv2d", "BatchNorm2d"]
    assert count_params(first.shortcut) == 2_176


def test_resnet44v2_shortcuts_take_the_pre_activated_input():
    """An identity block's output is conv_path(ReLU(BN(x))) + ReLU(BN(x)), not ... + x."""
    torch.manual_seed(0)
    block = create_model("resnet44v2").blocks[1].eval()
    for conv in (block.conv1, block.conv2):
        torch.nn.init.zeros_(conv.weight)  # the residual path gives 0: the output is the shortcut alone
    x = torch.randn(2, 32, 8, 8)
    with torch.no_grad():
        out = block(x)
        assert torch.equal(out, torch.relu(block.bn1(x)))
        assert not torch.equal(out, x)
    # the three-stage He et al. reading keeps x on the identity path
    he = create_model("resnet44v2_3stage").blocks[1].eval()
    for conv in (he.conv1, he.conv2):
        torch.nn.init.zeros_(conv.weight)
    with torch.no_grad():
        assert torch.equal(he(x), x)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_forward_shape(name):
    model = create_model(name).eval()
    shape = (3, MODELS[name].channels, 28, 28) if MODELS[name].channels == 1 else (3, 3, 32, 32)
    with torch.no_grad():
        out = model(torch.randn(shape))
    assert out.shape == (3, 100 if name.startswith("resnet44v2") else 10)
    assert torch.isfinite(out).all()


def test_seed_architecture_details():
    # ResNet20 keeps the Keras conv biases: the stem is 448 params (3*16*9 + 16) as in the table
    stem = create_model("resnet20").stem[0]
    assert stem.bias is not None and sum(p.numel() for p in stem.parameters()) == 448
    # FT-3's code: block 3 is depthwise separable + two undilated 3x3 convs; FT-5 dilates those two
    ft3, ft5 = create_model("cifar_ft3"), create_model("cifar_ft5")

    def dilations(model):
        return [m.dilation[0] for m in model.features if isinstance(m, torch.nn.Conv2d)]

    # stem, block 1 (2), transition 9, block 2 (3), transition 5, block 3 (2 after the separable), transition 3, block 4 (1 after the separable)
    assert dilations(ft3) == [1, 1, 1, 9, 1, 1, 1, 5, 1, 1, 3, 2]
    assert dilations(ft5) == [1, 1, 1, 9, 1, 1, 1, 5, 2, 2, 3, 2]
    # the transitions have a bias and are followed by BatchNorm alone (no ReLU); 3x3 convs have no bias
    layers = list(ft3.features)
    transitions = [i for i, m in enumerate(layers) if isinstance(m, torch.nn.Conv2d) and m.dilation[0] in (9, 5, 3)]
    assert len(transitions) == 3
    for i in transitions:
        assert layers[i].bias is not None and isinstance(layers[i + 1], torch.nn.BatchNorm2d)
        assert not isinstance(layers[i + 2], torch.nn.ReLU)
    assert all(m.bias is None for m in layers if isinstance(m, torch.nn.Conv2d) and m.dilation[0] not in (9, 5, 3))
    # the map is 4x4 before the pool (32 -> 16 -> 8 -> 4 by the transitions alone)
    x = torch.zeros(1, 3, 32, 32)
    for m in layers[:-2]:
        x = m(x)
    assert x.shape == (1, 64, 4, 4)
    # FT-6 moves dropout: Dropout2d only after the 3 pooling convs, plus one Dropout in the head
    ft6 = create_model("cifar_ft6")
    assert sum(isinstance(m, torch.nn.Dropout2d) for m in ft6.modules()) == 3
    assert sum(type(m) is Dropout for m in ft6.classifier) == 1  # element dropout: toolkit.models.blocks.Dropout


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
