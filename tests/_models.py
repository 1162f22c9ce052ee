"""Small models shared by the tests (random weights, fixed seeds)."""
import torch
from torch import nn


def smooth_cnn(channels: int = 2, size=(7, 6), classes: int = 4, dtype=torch.float64, seed: int = 0) -> nn.Module:
    """A softplus CNN: smooth, so every HVP mode has an exact answer."""
    g = torch.Generator().manual_seed(seed)
    m = nn.Sequential(
        nn.Conv2d(channels, 5, 3, padding=1), nn.Softplus(beta=3.0),
        nn.Conv2d(5, 4, 3, padding=1, stride=2), nn.Softplus(beta=3.0),
        nn.Flatten(), nn.LazyLinear(classes),
    )
    m(torch.zeros(1, channels, *size))
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (1.0 / max(1, p[0].numel()) ** 0.5))
    return m.to(dtype).eval()


def relu_cnn(channels: int = 1, size=(8, 8), classes: int = 5, dtype=torch.float64, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    m = nn.Sequential(
        nn.Conv2d(channels, 6, 3, padding=1), nn.ReLU(),
        nn.Conv2d(6, 6, 3, padding=1), nn.ReLU(),
        nn.Flatten(), nn.LazyLinear(16), nn.ReLU(), nn.Linear(16, classes),
    )
    m(torch.zeros(1, channels, *size))
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (1.5 / max(1, p[0].numel()) ** 0.5))
    return m.to(dtype).eval()
