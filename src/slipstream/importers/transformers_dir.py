"""transformers models, as users hold them: a ``save_pretrained`` directory, or the model object itself.

A transformers model does not export as it stands. Its ``forward()`` puts a ``cache`` before
``attention_mask``, so inputs by position feed the wrong argument; with ``use_cache`` on (a decoder's
default) it returns a ``DynamicCache``, which the exporter refuses; and it returns a ``ModelOutput`` of
several tensors when a server wants one. :func:`transformers_view` wraps it so that the graph takes the
inputs by name, runs with the cache off and returns the task's tensor (``logits``, or
``last_hidden_state`` for a bare encoder), with batch and sequence dynamic. The torch importer applies it
to every transformers model, so nobody writes that wrapper by hand.

:func:`import_transformers_dir` is the one-command path Optimum users know:
``slipstream convert path/to/model-dir -o bundle --task text-generation``. It loads only from disk
(``local_files_only``, hub offline): a model id that is not a local directory is an error that says how
to get the files, never a download.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Unpack, get_args

from slipstream.artifact.hashing import sha256_file, sha256_json
from slipstream.errors import ConfigError, InvalidModelError, MissingDependencyError
from slipstream.importers.framing import ImportFraming

if TYPE_CHECKING:
    import torch

    from slipstream.artifact.bundle import Bundle

Task = Literal["text-classification", "feature-extraction", "text-generation"]
TASKS: tuple[Task, ...] = get_args(Task)
# The Auto class each task loads with, as Optimum's exporter maps them.
AUTO_CLASSES: dict[Task, str] = {
    "text-classification": "AutoModelForSequenceClassification",
    "feature-extraction": "AutoModel",
    "text-generation": "AutoModelForCausalLM",
}
# Output fields chosen when the caller names none, in order of preference.
DEFAULT_OUTPUTS = ("logits", "last_hidden_state")
SEQUENCE = "sequence"
# Three sequence lengths for the parity proof: a length the export never saw, and two more, so a baked-in
# size or a position-dependent error shows up (each is recorded in the manifest's parity cases).
TEXT_PARITY_LENGTHS = (8, 16, 32)
# Example batch for the export trace: 2 rows of 9 tokens (distinct, above 1: torch.export fixes sizes 0 and 1).
EXAMPLE_SHAPE = (2, 9)
_OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
# Config fields that hold the size of the position table (BERT-style, GPT-2-style).
_POSITION_LIMITS = ("max_position_embeddings", "n_positions")


def is_transformers_model(model: object) -> bool:
    """Whether ``model`` is a transformers model (by its classes' modules; transformers is not imported)."""
    return any(cls.__module__.partition(".")[0] == "transformers" for cls in type(model).__mro__)


def transformers_view(
    model: Any, names: Sequence[str], args: Sequence[torch.Tensor], output_names: Sequence[str] | None
) -> tuple[Any, list[str]] | None:
    """``model`` as an exportable module (inputs by name, no cache, chosen outputs) and its output names.

    ``None`` when ``model`` is not a transformers model. Output fields named in ``output_names`` are
    returned when the model has them; otherwise ``logits``, else ``last_hidden_state``.
    """
    import inspect

    import torch

    from slipstream.importers.torch_inputs import keyword_module

    if not is_transformers_model(model) or not isinstance(model, torch.nn.Module):
        return None
    params = inspect.signature(model.forward).parameters
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    fixed = {k: v for k, v in (("use_cache", False), ("return_dict", True)) if k in params or takes_any}
    with torch.no_grad():
        out = model(**dict(zip(names, args, strict=True)), **fixed)
    fields = [k for k, v in out.items() if isinstance(v, torch.Tensor)] if isinstance(out, Mapping) else []
    if not fields:
        return None  # a model that returns plain tensors needs no view
    wanted = [n for n in output_names or () if n in fields]
    if output_names and len(wanted) == len(output_names):
        pick = wanted
    else:
        pick = [next((f for f in DEFAULT_OUTPUTS if f in fields), fields[0])]
    return keyword_module(model, names, fixed=fixed, pick=pick), pick


def text_parity_lengths(model: Any) -> tuple[int, ...]:
    """:data:`TEXT_PARITY_LENGTHS` that fit the model's position table (a quarter, half and all of a small one)."""
    config = getattr(model, "config", None)
    limit = next((getattr(config, k) for k in _POSITION_LIMITS if isinstance(getattr(config, k, None), int)), None)
    if limit is None or limit >= max(TEXT_PARITY_LENGTHS):
        return TEXT_PARITY_LENGTHS
    return tuple(sorted({max(2, limit // 4), max(2, limit // 2), limit}))


def looks_like_model_dir(path: Path) -> bool:
    """A ``save_pretrained`` directory: a folder with config.json."""
    return path.is_dir() and (path / "config.json").is_file()


def import_transformers_dir(
    source: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    task: Task | None = None,
    exporter: Literal["dynamo", "torchscript"] | None = None,
    output_names: Sequence[str] | None = None,
    **framing: Unpack[ImportFraming],
) -> Bundle:
    """Convert a local transformers model directory for ``task`` (inferred from config.json when None)."""
    from slipstream.importers.torch import import_torch, require
    from slipstream.importers.torch_sources import TorchSource

    path = Path(source)
    _check_model_dir(path)
    require("torch", "Converting a transformers model")
    if task is None:
        task = infer_task(path)
    model = load_model_dir(path, task)
    examples = example_tokens(model)
    config = model.config
    src = TorchSource(
        model=model,
        kind="transformers_dir",
        name=path.resolve().name,
        path=str(path),
        sha256=_dir_digest(path),
        example_inputs=examples,
        details={
            "task": task,
            "auto_class": AUTO_CLASSES[task],
            "architecture": type(model).__name__,
            "model_type": str(getattr(config, "model_type", "")),
        },
    )
    return import_torch(
        src, output, exporter=exporter, output_names=output_names, dynamic_axes=[f"1={SEQUENCE}"], **framing
    )


def _check_model_dir(path: Path) -> None:
    if looks_like_model_dir(path):
        return
    if not path.exists():
        found = "which is not on this disk (slipstream never downloads models)"
    elif path.is_dir():
        found = "a folder without config.json"
    else:
        found = "a file, not a folder"
    raise InvalidModelError(
        f"Expected a local transformers model directory (a folder with config.json and the weights, as "
        f"save_pretrained writes it); got '{path}', {found}.",
        source=str(path),
        hint="Save the model where the network is reachable, e.g. AutoModelForCausalLM.from_pretrained(ID)"
        ".save_pretrained('model-dir') or `hf download ID --local-dir model-dir`, then run "
        "`slipstream convert model-dir -o bundle --task TASK` on that folder.",
    )


def infer_task(path: Path) -> Task:
    """The task a directory's ``architectures`` names (``GPT2LMHeadModel`` → text-generation)."""
    try:
        architectures = json.loads((path / "config.json").read_text()).get("architectures") or []
    except (OSError, ValueError, AttributeError) as exc:
        raise InvalidModelError(
            f"'{path / 'config.json'}' is not a readable JSON object ({exc}).", source=str(path)
        ) from exc
    for arch in architectures:
        if arch.endswith(("ForCausalLM", "LMHeadModel")):
            return "text-generation"
        if arch.endswith("ForSequenceClassification"):
            return "text-classification"
        if arch.endswith("Model"):
            return "feature-extraction"
    raise ConfigError(
        f"Cannot tell the task of '{path}' from its config.json architectures {architectures}.",
        field="task",
        hint=f"Pass --task, one of {', '.join(TASKS)}.",
    )


@contextmanager
def _offline() -> Iterator[None]:
    """The hub stays offline while loading, whatever the caller's environment says."""
    saved = {k: os.environ.get(k) for k in _OFFLINE}
    os.environ.update(_OFFLINE)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def load_model_dir(path: Path, task: Task) -> Any:
    """The model in ``path`` for ``task``, from local files only, in eval mode."""
    try:
        with _offline():
            import transformers
    except ImportError:
        raise MissingDependencyError(
            "transformers", extra="transformers", feature="Converting a transformers model directory"
        ) from None
    auto = getattr(transformers, AUTO_CLASSES[task])
    try:
        with _offline():
            model = auto.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:  # transformers raises many types (ValueError, OSError, EnvironmentError...)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InvalidModelError(
            f"'{path}' could not be loaded as {AUTO_CLASSES[task]} for --task {task}: {first}",
            source=str(path),
            hint=f"Check that the folder holds the weights and that the model fits the task ({', '.join(TASKS)}).",
        ) from exc
    return model.eval()


def example_tokens(model: Any) -> dict[str, torch.Tensor]:
    """Trace inputs as a tokenizer gives them: token ids inside the vocabulary, masks of ones, type ids 0.

    ``token_type_ids`` is an input only where the model has a token-type table (BERT, not GPT-2, whose
    forward() accepts the argument but whose users never send it).
    """
    import inspect

    import torch

    config = model.config
    vocab = int(getattr(config, "vocab_size", 0) or 2)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, EXAMPLE_SHAPE, generator=generator, dtype=torch.int64)
    feeds = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    params = inspect.signature(model.forward).parameters
    if "token_type_ids" in params and int(getattr(config, "type_vocab_size", 0) or 0) > 0:
        feeds["token_type_ids"] = torch.zeros_like(ids)
    return feeds


def _dir_digest(path: Path) -> str:
    """One digest over every file in the directory (config, weights, tokenizer), by relative name."""
    files = sorted(p for p in path.rglob("*") if p.is_file())
    return sha256_json({str(p.relative_to(path)): sha256_file(p) for p in files})
