"""Small real PyTorch models for the importer tests (seeded, so every run builds the same weights)."""

from __future__ import annotations

import torch
from torch import nn

from slipstream.demo.minilm import SentenceEncoder

__all__ = ["CNN", "MLP", "CumulativeMax", "SentenceEncoder", "TokenEncoder", "build_mlp", "example_inputs"]


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.net(features), dim=-1)


class CNN(nn.Module):
    """A digits-sized CNN: [batch, 1, 8, 8] → 10 logits."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        )  # fmt: skip
        self.head = nn.Linear(16, 10)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.features(pixels), 1))


class TokenEncoder(nn.Module):
    """Token ids [batch, seq] → embeddings → 2-layer nn.TransformerEncoder → per-token states and a mean."""

    def __init__(self, vocab: int = 50, width: int = 16) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        layer = nn.TransformerEncoderLayer(width, nhead=2, dim_feedforward=32, dropout=0.1, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        states = self.encoder(self.embed(tokens))
        return states, states.mean(dim=1)


class _Running(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cummax(x, dim=1).values  # no ONNX conversion in either exporter


class CumulativeMax(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.running = _Running()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.running(self.proj(x))


def build_mlp() -> nn.Module:
    """An entry point in the ``package.module:factory`` form."""
    torch.manual_seed(0)
    return MLP().eval()


def example_inputs() -> tuple[torch.Tensor]:
    """The companion of :func:`build_mlp`."""
    return (torch.randn(4, 8, generator=torch.Generator().manual_seed(1)),)
