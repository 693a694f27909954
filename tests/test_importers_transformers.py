"""transformers models as users hold them: a save_pretrained directory converted in one command, and the model
object with example inputs keyed by name. Tiny configs, built here and saved to disk: nothing is downloaded.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
import transformers
from typer.testing import CliRunner

import slipstream
from slipstream.artifact import Bundle
from slipstream.cli.app import app
from slipstream.errors import ConfigError, InvalidModelError
from slipstream.importers.convert import detect_framework
from slipstream.importers.torch_inputs import bind_examples
from slipstream.importers.transformers_dir import (
    TEXT_PARITY_LENGTHS,
    infer_task,
    text_parity_lengths,
    transformers_view,
)
from slipstream.runtime import Engine

VOCAB = 1000
runner = CliRunner()


def _save(model: Any, path: Path) -> Path:
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def gpt2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=2, n_embd=64, n_head=2, vocab_size=VOCAB, n_positions=64, bos_token_id=0, eos_token_id=0
    )
    return _save(transformers.GPT2LMHeadModel(config).eval(), tmp_path_factory.mktemp("hf") / "tiny-gpt2")


@pytest.fixture(scope="session")
def bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    config = transformers.BertConfig(
        num_hidden_layers=2, hidden_size=64, num_attention_heads=2, intermediate_size=128, vocab_size=VOCAB,
        max_position_embeddings=64, num_labels=3,
    )  # fmt: skip
    return _save(transformers.BertForSequenceClassification(config).eval(), tmp_path_factory.mktemp("hf") / "tiny-bert")


def _cli_convert(source: Path, out: Path, task: str) -> Bundle:
    result = runner.invoke(app, ["convert", str(source), "-o", str(out), "--task", task, "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["parity"]["status"] == "passed"
    return Bundle.load(out)


@pytest.fixture(scope="session")
def gpt2_bundle(gpt2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    return _cli_convert(gpt2_dir, tmp_path_factory.mktemp("bundles") / "gpt2", "text-generation")


@pytest.fixture(scope="session")
def bert_cls_bundle(bert_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    return _cli_convert(bert_dir, tmp_path_factory.mktemp("bundles") / "bert-cls", "text-classification")


def _tokens(batch: int, length: int, *, seed: int, types: bool = False) -> dict[str, np.ndarray]:
    """Token ids inside the vocabulary and right-padded masks, as a tokenizer gives a ragged batch."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, VOCAB, (batch, length)).astype(np.int64)
    mask = np.ones_like(ids)
    for row in range(1, batch):
        mask[row, length - 3 * row :] = 0
    feeds = {"input_ids": ids, "attention_mask": mask}
    if types:
        feeds["token_type_ids"] = np.zeros_like(ids)
    return feeds


def _eager(model: Any, feeds: dict[str, np.ndarray], field: str) -> np.ndarray:
    with torch.no_grad():
        out = model(**{k: torch.from_numpy(v) for k, v in feeds.items()}, use_cache=False)
    return np.asarray(out[field].numpy())


@pytest.mark.slow
def test_a_gpt2_directory_converts_in_one_command_with_parity_at_three_lengths(gpt2_bundle: Bundle) -> None:
    manifest = gpt2_bundle.manifest
    assert manifest.parity is not None and manifest.parity.status == "passed"
    assert manifest.parity.data == "generated" and manifest.parity.informative
    proven = sorted({case.dims["sequence"] for case in manifest.parity.cases})
    assert proven == list(TEXT_PARITY_LENGTHS) == [8, 16, 32]
    assert {case.batch for case in manifest.parity.cases} == {1, 3}
    assert all(out.passed for case in manifest.parity.cases for out in case.outputs)
    assert [s.name for s in manifest.inputs] == ["input_ids", "attention_mask"]  # no cache, no type ids
    assert all(s.shape == ("batch", "sequence") for s in manifest.inputs)
    assert manifest.inputs[0].value_range == (0.0, VOCAB - 1)  # the parity ids came from the vocabulary
    assert [(s.name, s.shape) for s in manifest.outputs] == [("logits", ("batch", "sequence", VOCAB))]
    assert manifest.resolved["task"] == "text-generation"
    assert manifest.resolved["source_kind"] == "transformers_dir"
    assert manifest.source.path is not None and manifest.source.sha256 is not None


@pytest.mark.slow
def test_the_gpt2_bundle_runs_at_a_fourth_length_with_padded_rows(gpt2_bundle: Bundle, gpt2_dir: Path) -> None:
    model = transformers.AutoModelForCausalLM.from_pretrained(gpt2_dir, local_files_only=True).eval()
    feeds = _tokens(3, 24, seed=4)  # 24: a length the export and the proof never used
    got = Engine(gpt2_bundle).run(feeds)["logits"]
    assert got.shape == (3, 24, VOCAB)
    np.testing.assert_allclose(got, _eager(model, feeds, "logits"), atol=1e-4, rtol=1e-3)


@pytest.mark.slow
def test_a_bert_directory_converts_for_text_classification(bert_cls_bundle: Bundle, bert_dir: Path) -> None:
    manifest = bert_cls_bundle.manifest
    assert [s.name for s in manifest.inputs] == ["input_ids", "attention_mask", "token_type_ids"]
    assert [(s.name, s.shape) for s in manifest.outputs] == [("logits", ("batch", 3))]
    assert manifest.resolved["task"] == "text-classification"
    assert manifest.parity is not None
    assert sorted({c.dims["sequence"] for c in manifest.parity.cases}) == list(TEXT_PARITY_LENGTHS)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(bert_dir, local_files_only=True).eval()
    feeds = _tokens(2, 20, seed=5, types=True)
    np.testing.assert_allclose(Engine(bert_cls_bundle).run(feeds)["logits"], _eager(model, feeds, "logits"), atol=1e-5)


@pytest.mark.slow
def test_a_bert_directory_converts_for_feature_extraction(bert_dir: Path, tmp_path: Path) -> None:
    bundle = _cli_convert(bert_dir, tmp_path / "bert-features", "feature-extraction")
    manifest = bundle.manifest
    assert [(s.name, s.shape) for s in manifest.outputs] == [("last_hidden_state", ("batch", "sequence", 64))]
    assert manifest.resolved["auto_class"] == "AutoModel"
    model = transformers.AutoModel.from_pretrained(bert_dir, local_files_only=True).eval()
    feeds = _tokens(2, 12, seed=6, types=True)
    got = Engine(bundle).run(feeds)["last_hidden_state"]
    np.testing.assert_allclose(got, _eager(model, feeds, "last_hidden_state"), atol=1e-4)


def test_the_task_is_read_from_the_config_when_not_given(gpt2_dir: Path, bert_dir: Path, tmp_path: Path) -> None:
    assert detect_framework(gpt2_dir) == "transformers"  # a save_pretrained folder needs no --framework
    assert infer_task(gpt2_dir) == "text-generation"
    assert infer_task(bert_dir) == "text-classification"
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["BertForMaskedLM"]}))
    with pytest.raises(ConfigError, match="--task"):
        infer_task(tmp_path)


def test_parity_lengths_fit_the_position_table() -> None:
    small = SimpleNamespace(config=transformers.GPT2Config(n_positions=16))
    assert text_parity_lengths(small) == (4, 8, 16)  # 32 would run past a 16-row position table
    bert = SimpleNamespace(config=transformers.BertConfig(max_position_embeddings=512))
    assert text_parity_lengths(bert) == TEXT_PARITY_LENGTHS


class KeywordTokens(torch.nn.Module):
    """forward() puts another argument between input_ids and attention_mask, as GPT-2's does."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(50, 4)

    def forward(
        self, input_ids: torch.Tensor, cache: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        if cache is not None:
            raise TypeError("the mask was fed to the cache")
        if attention_mask is None:
            raise TypeError("no mask")
        return (self.embed(input_ids) * attention_mask.unsqueeze(-1).float()).sum(dim=1)


@pytest.mark.slow
def test_a_dict_of_examples_is_matched_by_name_not_position(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = KeywordTokens().eval()
    ids = torch.randint(0, 50, (2, 7))
    examples = {"attention_mask": torch.ones_like(ids), "input_ids": ids}  # not forward()'s order either
    bundle = slipstream.convert(model, tmp_path / "kw", example_inputs=examples, dynamic_axes=["1=seq"])
    assert [s.name for s in bundle.manifest.inputs] == ["input_ids", "attention_mask"]
    tokens = np.random.default_rng(0).integers(0, 50, (3, 5)).astype(np.int64)
    mask = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]], dtype=np.int64)
    got = Engine(bundle).run({"input_ids": tokens, "attention_mask": mask})["output"]
    want = model(input_ids=torch.from_numpy(tokens), attention_mask=torch.from_numpy(mask)).detach().numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert model.training is False and isinstance(model.embed, torch.nn.Embedding)  # the model itself is untouched


def test_example_keys_that_forward_does_not_take_fail_by_name() -> None:
    ids = torch.zeros(2, 3, dtype=torch.int64)
    with pytest.raises(ConfigError, match=r"\['input_idz'\] are not forward\(\) arguments"):
        bind_examples(KeywordTokens(), {"input_idz": ids, "attention_mask": ids})
    module, names, _ = bind_examples(KeywordTokens(), {"input_ids": ids})
    assert names == ["input_ids"] and isinstance(module, KeywordTokens)  # a leading prefix needs no wrapper


def test_a_gpt2_object_is_viewed_without_cache_returning_logits(gpt2_dir: Path) -> None:
    model = transformers.GPT2LMHeadModel.from_pretrained(gpt2_dir, local_files_only=True).eval()
    ids = torch.randint(0, VOCAB, (2, 5))
    _, names, args = bind_examples(model, {"attention_mask": torch.ones_like(ids), "input_ids": ids})
    assert names == ["input_ids", "attention_mask"]  # not forward()'s first two, (input_ids, cache)
    view = transformers_view(model, names, args, None)
    assert view is not None
    wrapped, picked = view
    assert picked == ["logits"]
    with torch.no_grad():
        out = wrapped(*args)
    assert isinstance(out, torch.Tensor) and out.shape == (2, 5, VOCAB)  # one tensor: no DynamicCache
    assert transformers_view(torch.nn.Linear(2, 2), ["x"], (torch.zeros(1, 2),), None) is None


@pytest.mark.slow
def test_a_gpt2_object_converts_from_a_dict_of_inputs(gpt2_dir: Path, tmp_path: Path) -> None:
    """The issue's failure: GPT2LMHeadModel with {input_ids, attention_mask} met forward(input_ids, cache, ...)."""
    model = transformers.GPT2LMHeadModel.from_pretrained(gpt2_dir, local_files_only=True).eval()
    ids = torch.randint(0, VOCAB, (2, 6))
    bundle = slipstream.convert(model, tmp_path / "g", example_inputs={"input_ids": ids, "attention_mask": ids * 0 + 1})
    manifest = bundle.manifest
    assert [s.name for s in manifest.inputs] == ["input_ids", "attention_mask"]
    assert [o.name for o in manifest.outputs] == ["logits"] and manifest.parity is not None
    assert sorted({c.dims["sequence"] for c in manifest.parity.cases}) == list(TEXT_PARITY_LENGTHS)
    assert model.training is False and model.config.use_cache is True  # the caller's model is left as it was


@pytest.mark.parametrize("source", ["openai-community/gpt2", "no/such/dir"])
def test_a_model_that_is_not_on_disk_is_a_clear_error_not_a_download(
    source: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError("a network connection was attempted")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    with pytest.raises(InvalidModelError, match="not on this disk") as caught:
        slipstream.convert(source, tmp_path / "b", task="text-generation")
    assert "config.json" in str(caught.value) and "save_pretrained" in (caught.value.hint or "")
    result = runner.invoke(app, ["convert", source, "-o", str(tmp_path / "b"), "--task", "text-generation"])
    assert result.exit_code != 0 and "not on this disk" in " ".join(result.output.split())


def test_a_folder_without_config_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidModelError, match=r"a folder without config\.json"):
        slipstream.convert(tmp_path, tmp_path / "b", task="feature-extraction")
    result = runner.invoke(app, ["convert", str(tmp_path), "-o", str(tmp_path / "b"), "--task", "summarization"])
    assert result.exit_code != 0 and "--task" in " ".join(result.output.split())
