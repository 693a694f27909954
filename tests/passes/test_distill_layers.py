"""Layer-wise distillation: every encoder layer's hidden states and the mean-pooled sentence embedding as
targets, against output-only distillation; the config's checks; the corpus cut into sentences.

A tiny BERT (BertConfig, 2 layers) under a sentence-transformers head (mean pooling over the mask, L2 norm),
so each test runs in about a second on one thread.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from slipstream.demo.minilm import SentenceEncoder  # MiniLM's own pooling, on a tiny BERT here
from slipstream.errors import ConfigError
from slipstream.passes.distill import Distill, DistillConfig, distill, gap, hidden_gap
from slipstream.passes.slim_attention import SlimSettings, slim_attention
from slipstream.passes.text_corpus import sentences, side, unlabeled_text
from slipstream.passes.torch_model import TorchModel
from tests.passes.test_slim_attention import tiny_bert, tokens

pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module")
def pair() -> tuple[nn.Module, TorchModel]:
    """A teacher whose layers matter (larger weights than BERT's init), and its slimmed copy."""
    teacher = SentenceEncoder(tiny_bert(seed=3))
    with torch.no_grad():
        for p in teacher.bert.encoder.parameters():
            p.mul_(4.0 if p.dim() == 2 else 1.0)
    slim, _ = slim_attention(TorchModel(teacher.eval(), tokens(0)), SlimSettings(heads=0.5, ffn=0.5))
    return teacher, slim


def test_layer_wise_distillation_closes_the_hidden_state_gap_that_output_only_leaves(
    pair: tuple[nn.Module, TorchModel],
) -> None:
    teacher, slim = pair
    train = [tokens(s, batch=16) for s in range(20, 28)]
    heldout = [tokens(s, batch=16) for s in (95, 96)]
    before = hidden_gap(slim.module, teacher, heldout)
    output_only, report_out = distill(slim, teacher, train,
                                      DistillConfig(steps=40, lr=3e-3, layer_weight=0, embedding_weight=0))  # fmt: skip
    layered, report_layers = distill(slim, teacher, train, DistillConfig(steps=40, lr=3e-3))
    assert report_out.weights is not None and (report_out.weights.layers, report_out.weights.embedding) == (0, 0)
    assert report_layers.weights is not None and report_layers.weights.layers == 1.0  # the default on an encoder
    after_out = hidden_gap(output_only.module, teacher, heldout)
    after_layers = hidden_gap(layered.module, teacher, heldout)
    assert after_layers < 0.5 * after_out and after_layers < 0.25 * before, (before, after_out, after_layers)
    # and the sentence embeddings, which output-only trains on directly, come out at least as close
    cos_out, cos_layers = (gap(m.module, teacher, heldout, "cosine") for m in (output_only, layered))
    assert cos_layers < cos_out < gap(slim.module, teacher, heldout, "cosine"), (
        cos_out,
        cos_layers,
    )


def test_the_embedding_term_alone_trains_toward_the_pooled_sentence_embedding(
    pair: tuple[nn.Module, TorchModel],
) -> None:
    teacher, slim = pair
    train = [tokens(s, batch=16) for s in range(30, 34)]
    config = DistillConfig(steps=20, lr=3e-3, output_weight=0, layer_weight=0, embedding_weight=1)
    student, report = distill(slim, teacher, train, config)
    assert report.last_loss < 0.5 * report.first_loss
    assert gap(student.module, teacher, train, "cosine") < gap(slim.module, teacher, train, "cosine")


def test_the_config_refuses_no_term_and_out_of_range_values() -> None:
    with pytest.raises(ConfigError, match="all 0: nothing to train toward"):
        Distill().make_config({"output_weight": 0, "layer_weight": 0, "embedding_weight": 0})
    with pytest.raises(ConfigError, match="layer_weight"):
        Distill().make_config({"layer_weight": -1})
    with pytest.raises(ConfigError, match="warmup"):
        Distill().make_config({"warmup": 1.0})
    with pytest.raises(ConfigError, match="chunks"):
        Distill().make_config({"chunks": "words"})
    assert Distill().make_config({"output_weight": 0}).layer_weight is None  # the others still resolve to 1


def test_layer_terms_on_a_model_without_encoder_layers_are_refused() -> None:
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
    model = TorchModel(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)).eval(), (torch.zeros(2, 4),))
    batches = [(torch.randn(8, 4),)]
    with pytest.raises(ConfigError, match="0 encoder layers") as caught:
        distill(model, mlp, batches, DistillConfig(steps=2, layer_weight=1.0))
    assert "layer_weight: 0" in str(caught.value.hint)
    with pytest.raises(ConfigError, match="every term resolved to 0"):
        distill(model, mlp, batches, DistillConfig(steps=2, output_weight=0))
    _, report = distill(model, mlp, batches, DistillConfig(steps=3, warmup=0.5))  # defaults: output only
    assert report.weights is not None and (report.weights.layers, report.weights.embedding) == (0, 0)
    assert len(report.losses) == 3


def test_a_student_with_fewer_layers_than_its_teacher_is_refused(pair: tuple[nn.Module, TorchModel]) -> None:
    teacher, slim = pair
    shallow = slim.copy()
    shallow.module.bert.encoder.layer = shallow.module.bert.encoder.layer[:1]
    with pytest.raises(ConfigError, match="student has 1 encoder layers, the teacher 2"):
        distill(shallow, teacher, [tokens(1)], DistillConfig(steps=1))


def test_the_corpus_cut_into_sentences_keeps_each_on_its_paragraphs_side() -> None:
    assert sentences("One two three four. Five six seven eight! Too short. Is this the last one here?") == [
        "One two three four.",
        "Five six seven eight!",
        "Is this the last one here?",
    ]
    assert sentences("Use a proxy, e.g. Squid or similar tools. Done now, really done.") == [
        "Use a proxy, e.g. Squid or similar tools.",
        "Done now, really done.",
    ]
    train = unlabeled_text(300, chunks="sentences")
    heldout = unlabeled_text(60, split="heldout", chunks="sentences")
    paragraphs = unlabeled_text(300)
    assert len(train) == 300 and len(set(train)) == 300 and not set(train) & set(heldout)
    assert all(len(t.split()) >= 4 for t in train)
    assert sum(len(t) for t in train) / 300 < sum(len(p) for p in paragraphs) / 300  # shorter than paragraphs
    assert all(any(t in p for p in paragraphs) for t in train[:50])  # cut from the train side's paragraphs
    assert all(side(p) == "train" for p in paragraphs)
