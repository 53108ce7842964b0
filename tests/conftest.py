import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402


class ToyNet(nn.Module):
    """A tiny conv net with BatchNorm on 1 x 8 x 8 images."""

    def __init__(self, num_classes=3):
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Linear(8 * 4 * 4, num_classes)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x)))
        x = nn.functional.avg_pool2d(x, 2)
        return self.head(x.flatten(1))


def toy_data(n=96, num_classes=3, seed=0):
    """Class c lights up the c-th horizontal band of an 8 x 8 image, plus noise."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % num_classes
    x = torch.rand(n, 1, 8, 8, generator=g) * 0.6
    for c in range(num_classes):
        rows = slice(c * 8 // num_classes, (c + 1) * 8 // num_classes)
        x[y == c, :, rows, :] += 0.25
    return x.clamp(0, 1), y


@pytest.fixture(scope="session")
def trained_toy():
    torch.manual_seed(0)
    model = ToyNet()
    x, y = toy_data()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(60):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()
    return model, x, y
