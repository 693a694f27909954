"""Zoo builders for PyTorch and transformers models: random weights (BatchNorm statistics settled), built in
well under a second each. transformers models come from tiny configs, so nothing is downloaded."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tests.zoo.base import Arrays, Built, Expected, rng


def _torch_expected(module: Any, names: Sequence[str], pick: Callable[[Any], Any] | None = None) -> Expected:
    def run(feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        import torch

        with torch.no_grad():
            out = module(**{n: torch.from_numpy(np.asarray(feeds[n])) for n in names})
        out = pick(out) if pick is not None else out
        leaves = list(out) if isinstance(out, tuple | list) else [out]
        return [t.detach().numpy() for t in leaves]

    return run


def _settle_batchnorm(module: Any, make_batch: Callable[[], Any], steps: int = 4) -> Any:
    """Random BatchNorm statistics push activations to a constant (a parity check on a constant proves nothing):
    a few forward passes in training mode set them from real batch statistics."""
    import torch

    module.train()
    with torch.no_grad():
        for _ in range(steps):
            module(make_batch())
    return module.eval()


def torch_mlp(_: Path) -> Built:
    import torch
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 5)).eval()
    x = rng(0).standard_normal((3, 12), dtype=np.float32)
    return Built(model, {"example_inputs": (torch.from_numpy(x),)}, {"input": x}, _torch_expected(model, ["input"]))


def _conv_bn(c_in: int, c_out: int, *, stride: int = 1, groups: int = 1, kernel: int = 3) -> Any:
    from torch import nn

    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, groups=groups, bias=False), nn.BatchNorm2d(c_out)
    )


def torch_resnet(_: Path) -> Built:
    """Two residual blocks (conv-bn-relu-conv-bn + identity or 1×1 projection), global pooling, a linear head."""
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self, c_in: int, c_out: int, stride: int) -> None:
            super().__init__()
            self.body = nn.Sequential(_conv_bn(c_in, c_out, stride=stride), nn.ReLU(), _conv_bn(c_out, c_out))
            self.skip = (
                nn.Identity() if stride == 1 and c_in == c_out else _conv_bn(c_in, c_out, stride=stride, kernel=1)
            )

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.relu(self.body(x) + self.skip(x))

    class TinyResNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Sequential(_conv_bn(3, 8), nn.ReLU())
            self.blocks = nn.Sequential(Block(8, 8, 1), Block(8, 16, 2))
            self.head = nn.Linear(16, 10)

        def forward(self, image: torch.Tensor) -> torch.Tensor:
            return self.head(self.blocks(self.stem(image)).mean(dim=(2, 3)))

    torch.manual_seed(1)
    model = _settle_batchnorm(TinyResNet(), lambda: torch.randn(16, 3, 16, 16))
    x = rng(1).standard_normal((2, 3, 16, 16), dtype=np.float32)
    return Built(model, {"example_inputs": (torch.from_numpy(x),)}, {"image": x}, _torch_expected(model, ["image"]))


def torch_mobilenet(_: Path) -> Built:
    """MobileNet-style depthwise-separable convolutions (depthwise 3×3 + pointwise 1×1, ReLU6)."""
    import torch
    from torch import nn

    def separable(c_in: int, c_out: int, stride: int) -> Any:
        return nn.Sequential(
            _conv_bn(c_in, c_in, stride=stride, groups=c_in), nn.ReLU6(), _conv_bn(c_in, c_out, kernel=1), nn.ReLU6()
        )

    class TinyMobileNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features = nn.Sequential(
                _conv_bn(3, 8, stride=2), nn.ReLU6(), separable(8, 16, 1), separable(16, 32, 2)
            )
            self.head = nn.Linear(32, 6)

        def forward(self, image: torch.Tensor) -> torch.Tensor:
            return self.head(self.features(image).mean(dim=(2, 3)))

    torch.manual_seed(2)
    model = _settle_batchnorm(TinyMobileNet(), lambda: torch.randn(16, 3, 24, 24))
    x = rng(2).standard_normal((2, 3, 24, 24), dtype=np.float32)
    return Built(model, {"example_inputs": (torch.from_numpy(x),)}, {"image": x}, _torch_expected(model, ["image"]))


def torch_conv1d(_: Path) -> Built:
    import torch
    from torch import nn

    class Conv1dNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Sequential(
                nn.Conv1d(4, 16, 5, padding=2), nn.ReLU(), nn.Conv1d(16, 16, 3, padding=1), nn.ReLU()
            )
            self.head = nn.Linear(16, 3)

        def forward(self, signal: torch.Tensor) -> torch.Tensor:
            return self.head(self.conv(signal).amax(dim=2))

    torch.manual_seed(3)
    model = Conv1dNet().eval()
    x = rng(3).standard_normal((2, 4, 32), dtype=np.float32)
    return Built(model, {"example_inputs": (torch.from_numpy(x),)}, {"signal": x}, _torch_expected(model, ["signal"]))


def torch_vit(_: Path) -> Built:
    """A ViT: 4×4 patches of a 16×16 image, a class token, learned positions, two TransformerEncoderLayers."""
    import torch
    from torch import nn

    class TinyViT(nn.Module):
        def __init__(self, dim: int = 32) -> None:
            super().__init__()
            self.patches = nn.Conv2d(3, dim, 4, 4)
            self.cls = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
            self.pos = nn.Parameter(torch.randn(1, 17, dim) * 0.02)
            layer = nn.TransformerEncoderLayer(dim, 2, 64, dropout=0.0, batch_first=True, norm_first=True)
            self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
            self.norm = nn.LayerNorm(dim)
            self.head = nn.Linear(dim, 10)

        def forward(self, image: torch.Tensor) -> torch.Tensor:
            tokens = self.patches(image).flatten(2).transpose(1, 2)
            tokens = torch.cat([self.cls.expand(tokens.shape[0], -1, -1), tokens], dim=1) + self.pos
            return self.head(self.norm(self.encoder(tokens))[:, 0])

    torch.manual_seed(4)
    model = TinyViT().eval()
    x = rng(4).standard_normal((2, 3, 16, 16), dtype=np.float32)
    return Built(model, {"example_inputs": (torch.from_numpy(x),)}, {"image": x}, _torch_expected(model, ["image"]))


def recurrent(cell: str) -> Callable[[Path], Built]:
    def build(_: Path) -> Built:
        import torch
        from torch import nn

        class Recurrent(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.rnn = (nn.LSTM if cell == "lstm" else nn.GRU)(8, 16, num_layers=1, batch_first=True)
                self.head = nn.Linear(16, 4)

            def forward(self, sequence: torch.Tensor) -> torch.Tensor:
                out, _ = self.rnn(sequence)
                return self.head(out[:, -1])

        torch.manual_seed(5)
        model = Recurrent().eval()
        x = rng(5).standard_normal((2, 10, 8), dtype=np.float32)
        return Built(
            model, {"example_inputs": (torch.from_numpy(x),)}, {"sequence": x}, _torch_expected(model, ["sequence"])
        )

    return build


def _token_batch(vocab: int, batch: int, seq: int, seed: int) -> Arrays:
    """Realistic token ids (no padding id 0 inside the text) and a mask with the last row's tail padded."""
    ids = rng(seed).integers(1, vocab, (batch, seq), dtype=np.int64)
    mask = np.ones((batch, seq), dtype=np.int64)
    mask[-1, seq - 3 :] = 0
    ids[mask == 0] = 0
    return {"input_ids": ids, "attention_mask": mask}


def bert_classifier(_: Path) -> Built:
    """BERT-style encoder with a classification head, from a tiny transformers config (random weights)."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(6)
    config = BertConfig(
        vocab_size=128, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=64, num_labels=3,
    )  # fmt: skip
    model = BertForSequenceClassification(config).eval()
    feeds = _token_batch(128, 2, 12, seed=6)
    kwargs = {
        "example_inputs": {k: torch.from_numpy(v) for k, v in feeds.items()},
        "dynamic_axes": ["input_ids:1=sequence", "attention_mask:1=sequence"],
    }
    return Built(model, kwargs, feeds, _torch_expected(model, list(feeds), pick=lambda o: o.logits))


def _tiny_gpt2() -> Any:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(8)
    config = GPT2Config(vocab_size=128, n_positions=64, n_embd=32, n_layer=1, n_head=2, bos_token_id=1, eos_token_id=2)
    return GPT2LMHeadModel(config).eval()


def _gpt2_expected(model: Any) -> Expected:
    def run(feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        import torch

        with torch.no_grad():
            out = model(**{k: torch.from_numpy(np.asarray(v)) for k, v in feeds.items()}, use_cache=False)
        return [out.logits.numpy()]

    return run


def gpt2_decoder(_: Path) -> Built:
    """GPT-2-style decoder (language-model head) in memory, example inputs given as a dict, as users hold it."""
    import torch

    model = _tiny_gpt2()
    feeds = {"input_ids": rng(8).integers(1, 128, (2, 12), dtype=np.int64)}
    kwargs = {
        "example_inputs": {k: torch.from_numpy(v) for k, v in feeds.items()},
        "dynamic_axes": ["input_ids:1=sequence"],
    }
    return Built(model, kwargs, feeds, _gpt2_expected(model))


def gpt2_directory(work: Path) -> Built:
    """The same decoder saved with save_pretrained and converted from its directory with --task text-generation."""
    model = _tiny_gpt2()
    directory = work / "gpt2-dir"
    model.save_pretrained(directory)
    feeds = _token_batch(128, 2, 12, seed=9)  # the directory's export takes input_ids and attention_mask
    return Built(directory, {"task": "text-generation"}, feeds, _gpt2_expected(model))
