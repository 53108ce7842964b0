"""mlp_tiny: an MLP written as convolutions (hf_csr.models.mlp), checked against the plain MLP it stands for."""

import pytest
import timm
import torch
from torch import nn

import hf_csr  # noqa: F401  (registers the models)
from hf_csr.models.mlp import DenseConv2d


def test_the_fast_path_is_the_convolution():
    torch.manual_seed(0)
    layer = DenseConv2d(3, 7, 5)
    x = torch.randn(4, 3, 5, 5)
    assert torch.allclose(layer(x), nn.Conv2d.forward(layer, x), atol=1e-5)
    bigger = torch.randn(2, 3, 9, 9)  # more than one position: the convolution itself
    assert torch.equal(layer(bigger), nn.Conv2d.forward(layer, bigger))


def test_mlp_tiny_is_the_mlp_784_512_256_256_10():
    torch.manual_seed(0)
    model = timm.create_model("mlp_tiny").eval()
    assert model.pretrained_cfg["input_size"] == (1, 28, 28) and model.num_classes == 10
    layers = [model.conv1, model.stages[0][0][1], model.stages[1][0][1]]
    dense = [nn.Linear(l.in_channels * l.kernel_size[0] * l.kernel_size[1], l.out_channels) for l in layers]
    for d, l in zip(dense, layers):
        d.weight.data = l.weight.detach().flatten(1).clone()
        d.bias.data = l.bias.detach().clone()
    mlp = nn.Sequential(nn.Flatten(), dense[0], nn.ReLU(), dense[1], nn.ReLU(), dense[2], nn.ReLU(), model.fc)
    assert [d.weight.shape for d in dense] == [(512, 784), (256, 512), (256, 256)]
    x = torch.rand(6, 1, 28, 28)
    with torch.no_grad():
        assert torch.allclose(model(x), mlp(x), atol=1e-5)
    assert sum(p.numel() for p in model.parameters()) == 784 * 512 + 512 + 512 * 256 + 256 + 256 * 256 + 256 + 256 * 10 + 10


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="hidden must list at least 3"):
        timm.create_model("mlp_tiny", hidden=(8, 8))
    with pytest.raises(ValueError, match="unexpected ConvMLP arguments"):
        timm.create_model("mlp_tiny", width=8)
