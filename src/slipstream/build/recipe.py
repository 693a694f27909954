"""The build recipe: a typed YAML file, validated in full before any work starts."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from slipstream.build.text_slim import SlimLadderConfig
from slipstream.errors import ConfigError
from slipstream.evaluate.metrics import METRIC_NAMES
from slipstream.evaluate.robust import RobustnessConfig
from slipstream.runtime.targets import TargetName

Objective = Literal["latency", "throughput", "size"]
PassRefValue = str | dict[str, dict[str, Any]]


class _Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class DataConfig(_Strict):
    eval: str = Field(description="Evaluation data: .npz/.csv/.parquet or file.py:fn; labels for label metrics.")
    calibration: str | None = Field(default=None, description="Calibration data for static int8 (default: eval).")
    train: str | None = Field(default=None, description="Training data for recovery fine-tuning.")


class Budget(_Strict):
    max_accuracy_drop: float = Field(ge=0, description="Largest allowed quality loss versus the baseline.")
    kind: Literal["absolute", "relative"] = Field(
        default="absolute", description="absolute: in metric units (0.01 = 1 point); relative: fraction of baseline."
    )
    min_speedup: float = Field(
        default=1.05, ge=1.0, description="A candidate must beat the baseline's objective by this factor to count."
    )
    max_robust_accuracy_drop: float | None = Field(
        default=None,
        ge=0,
        description="Largest allowed loss of robust accuracy versus the baseline, over every attack and ε "
        "measured (see robustness); absolute or relative like max_accuracy_drop. None: not enforced.",
    )


class Candidate(_Strict):
    name: str = Field(min_length=1, description="Label in the run record and report.")
    passes: tuple[PassRefValue, ...] = Field(min_length=1, description="Pass chain: 'name:k=v,...' or {name: {...}}.")


class Recipe(_Strict):
    """What to build, on which data, under which budget, for which target."""

    name: str = Field(default="build", min_length=1, description="Name of the build and of the winner bundle.")
    model: str = Field(description="Source: a bundle directory, an .onnx file, or what `slipstream convert` takes.")
    input_shape: str | None = Field(
        default=None, description="Input shape for sources that need one, e.g. 'batch,1,8,8' for a torch entry point."
    )
    dynamic_axes: tuple[str, ...] = Field(
        default=(),
        description="Extra dynamic axes for a torch source, as INPUT:AXIS=NAME or AXIS=NAME (e.g. '1=seq').",
    )
    data: DataConfig
    metric: str = Field(default="accuracy", description=f"One of {', '.join(METRIC_NAMES)}.")
    budget: Budget
    target: TargetName = Field(default="cpu", description="Where the winner will run.")
    objective: Objective = Field(default="latency", description="What to optimize within the budget.")
    batch_size: int = Field(default=1, ge=1, description="Batch size at which latency and throughput are measured.")
    candidates: Literal["auto"] | tuple[Candidate, ...] = Field(
        default="auto", description="'auto' for the standard ladder, or explicit pass chains."
    )
    output: str = Field(default="build-output", description="Directory for candidates, run.json and the report.")
    max_eval_rows: int = Field(default=2000, ge=1, description="Cap on evaluation rows, to bound build time.")
    bench_time_s: float = Field(
        default=2.0, gt=0, le=60, description="Time budget for each candidate's latency measurement, in seconds."
    )
    seed: int = Field(default=0, description="Seed for every random choice.")
    robustness: RobustnessConfig = Field(
        default_factory=RobustnessConfig,
        description="Robust accuracy per candidate: FGSM/PGD from a torch source, noise and SimBA on any bundle.",
    )
    slim: SlimLadderConfig = Field(
        default_factory=SlimLadderConfig,
        description="Slim candidates of the auto ladder for a transformers text encoder source (heads and "
        "feed-forward neurons pruned, then distilled on unlabeled text): amounts, training length, tokenizer.",
    )

    @field_validator("metric")
    @classmethod
    def _known_metric(cls, value: str) -> str:
        if value not in METRIC_NAMES:
            raise ValueError(f"unknown metric {value!r}; expected one of {', '.join(METRIC_NAMES)}")
        return value

    @field_validator("dynamic_axes")
    @classmethod
    def _axes_parse(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        from slipstream.importers.torch_inputs import parse_dynamic_axis

        for text in value:
            try:
                parse_dynamic_axis(text)
            except ConfigError as exc:
                raise ValueError(f"{exc.message} {exc.hint or ''}".strip().rstrip(".")) from exc
        return value


def _field_path(loc: tuple[int | str, ...]) -> str:
    return ".".join(str(p) for p in loc) or "<root>"


def _known_fields(loc: tuple[int | str, ...]) -> list[str]:
    """The field names valid at the parent of ``loc``, for 'did you mean' suggestions."""
    model: type[BaseModel] = Recipe
    for part in loc[:-1]:
        if not isinstance(part, str) or part not in model.model_fields:
            return []
        annotation = model.model_fields[part].annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            model = annotation
        else:
            return []
    return list(model.model_fields)


def parse_recipe(raw: Any, source: str = "<recipe>") -> Recipe:
    """Validate a parsed YAML mapping; one ConfigError names every bad field (with suggestions)."""
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{source}: a recipe must be a mapping of fields; got {type(raw).__name__}.",
            hint="Start from examples/digits-cnn.yaml.",
        )
    try:
        return Recipe.model_validate(raw)
    except ValidationError as exc:
        problems: list[str] = []
        first_field: str | None = None
        for err in exc.errors():
            path = _field_path(err["loc"])
            first_field = first_field or path
            if err["type"] == "extra_forbidden":
                name = str(err["loc"][-1])
                close = difflib.get_close_matches(name, _known_fields(err["loc"]), n=1)
                tip = f" (did you mean '{close[0]}'?)" if close else ""
                problems.append(f"unknown field '{path}'{tip}")
            else:
                problems.append(f"'{path}': {err['msg']}")
        raise ConfigError(
            f"{source}: {'; '.join(problems)}.",
            field=first_field,
            hint="Fields: " + ", ".join(Recipe.model_fields) + ".",
        ) from exc


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a recipe file; relative paths in it stay relative to the working directory."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"No recipe at '{file}'.", field="recipe", hint="Check the path.")
    try:
        raw = yaml.safe_load(file.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{file} is not valid YAML: {exc}", field="recipe") from exc
    return parse_recipe(raw, str(file))


def precheck_recipe_data(recipe: Recipe, *, needs_labels: bool) -> None:
    """The recipe's data, checked before the source is converted: the files exist and read, the .npz files
    name the same inputs, and the evaluation data has labels when the metric compares with labels."""
    from slipstream.data.datasets import precheck_data

    why = f"metric '{recipe.metric}' compares with labels" if needs_labels else None
    refs = {"data.eval": recipe.data.eval, "data.calibration": recipe.data.calibration, "data.train": recipe.data.train}
    precheck_data(refs, labels_for=why)
