"""The one pass runner: caching, timing, fidelity and lineage for every kind of pass.

Passes only ``apply()``. The runner fingerprints what each result depends on (the input model's
digest, ``name@version``, the config hash, the seed and any data), looks the result up in the
:class:`PassCache`, times the work, and records exactly one typed lineage entry per pass:

- ONNX passes: a bundle in, a bundle out; the cache holds the model and what the pass resolved.
- torch passes: a torch model in memory, so the result is not stored; its fingerprint is the cache
  key it *would* have, which makes the export after it cacheable without running it again.
- the export and import steps (something → bundle): the cache holds the whole bundle the importer
  wrote, parity proof included, under the fingerprint of the model it came from.
"""

from __future__ import annotations

import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from slipstream.artifact.bundle import Bundle, Step, write_bundle
from slipstream.artifact.hashing import sha256_json
from slipstream.data.datasets import arrays_digest
from slipstream.errors import BundleExistsError, PassError, SlipstreamError
from slipstream.passes.base import AnyPass, PassConfig, PassRun, PassWarning
from slipstream.passes.cache import PassCache
from slipstream.passes.fidelity import load_inputs
from slipstream.passes.onnx_run import compute_onnx, output_manifest
from slipstream.passes.torch_base import TorchContext, weights_digest
from slipstream.passes.torch_model import TorchModel, TorchStep

if TYPE_CHECKING:
    from slipstream.artifact.manifest import Manifest
    from slipstream.passes.recipe import Progress
    from slipstream.passes.torch_model import TorchData

PlannedStep = tuple[Any, AnyPass, PassConfig]  # (PassSpec, pass, config), as recipe.plan() returns them


@dataclass(frozen=True)
class BundleContext:
    """What a pass that writes a bundle (export, import) may use: a scratch directory and the bundle's name."""

    workdir: Path
    name: str


@dataclass(frozen=True)
class ChainRun:
    """The outcome of a recipe: the last bundle, and how many of its steps the cache answered."""

    bundle: Bundle
    steps: int
    cache_hits: int


def fingerprint(model: TorchModel) -> str:
    """What a torch model's results are cached under: its recorded fingerprint, else its weights' digest."""
    return model.fingerprint if model.fingerprint is not None else weights_digest(model.module)


@dataclass(frozen=True)
class PassRunner:
    """Runs passes of every kind with one set of inputs besides the model.

    ``data`` is an .npz of real inputs named like the model's inputs (ONNX passes measure fidelity on
    it; quantize.static calibrates on it). ``train``/``eval``/``teacher`` feed torch passes.
    """

    cache: PassCache | None = None
    seed: int = 0
    data: Path | None = None
    train: TorchData | None = None
    eval: TorchData | None = None
    teacher: Any = None
    _torch_ctx: TorchContext = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        ctx = TorchContext(train=self.train, eval=self.eval, teacher=self.teacher, seed=self.seed)
        object.__setattr__(self, "_torch_ctx", ctx)

    # -- ONNX → ONNX ---------------------------------------------------------------------------------
    def run_onnx(
        self, p: AnyPass, bundle: Bundle, output: str | Path, config: PassConfig | None = None, *, overwrite: bool
    ) -> PassRun:
        """Apply ``p`` to ``bundle`` and write the result to ``output`` with one new lineage entry."""
        cfg = config if config is not None else p.make_config()
        if Path(output).exists() and not overwrite:
            raise BundleExistsError(
                f"Refusing to write the output of {p.step_name} to '{output}': it already exists.",
                path=output,
                hint="Choose another output path, or pass overwrite=True (--overwrite).",
            )
        started = time.perf_counter()
        # The seed drives generated data (calibration, fidelity), so it is part of what the result depends on.
        arrays = load_inputs(self.data, bundle.manifest.inputs) if self.data is not None else None
        data_sha = arrays_digest(arrays) if arrays is not None else None
        key = PassCache.key(bundle.model_sha256, p.step_name, sha256_json([p.config_hash(cfg), self.seed, data_sha]))
        hit = self.cache.get(key, p.name) if self.cache is not None else None
        if hit is not None:
            result = hit
        else:
            ctx_data = (arrays, f"file {self.data}") if arrays is not None else None
            result = compute_onnx(p, bundle, cfg, self.seed, ctx_data)
        duration = time.perf_counter() - started
        for text in result.warnings:
            warnings.warn(f"{p.step_name}: {text}", PassWarning, stacklevel=3)
        manifest = output_manifest(bundle.manifest, result, p.name, cache_hit=hit is not None, seed=self.seed)
        step = Step(
            name=p.step_name, config=cfg.model_dump(mode="json"), duration_s=duration, input_sha256=bundle.model_sha256
        )
        written = write_bundle(output, result.model, manifest, step=step, overwrite=overwrite)
        if self.cache is not None and hit is None:
            self.cache.put(key, p.name, result, step)
        return PassRun(
            bundle=written,
            step=p.step_name,
            duration_s=duration,
            cache_hit=hit is not None,
            warnings=tuple(result.warnings),
        )

    # -- torch → torch -------------------------------------------------------------------------------
    @cached_property
    def _torch_data_digest(self) -> str:
        def digest(data: TorchData | None) -> str | None:
            return arrays_digest({"x": data.inputs, "y": data.targets}) if data is not None else None

        teacher = weights_digest(self.teacher) if self.teacher is not None else None
        return sha256_json([digest(self.train), digest(self.eval), teacher])

    def torch_key(self, p: AnyPass, model_fingerprint: str, config: PassConfig) -> str:
        """The fingerprint of ``p``'s output: its input's, name@version, config, seed and training data."""
        extra = sha256_json([p.config_hash(config), self.seed, self._torch_data_digest])
        return PassCache.key(model_fingerprint, p.step_name, extra)

    def run_torch(self, p: AnyPass, model: TorchModel, config: PassConfig | None = None) -> TorchModel:
        """Apply a torch pass; the new model carries one more typed step and its own fingerprint."""
        cfg = config if config is not None else p.make_config()
        key = self.torch_key(p, fingerprint(model), cfg)
        started = time.perf_counter()
        before = weights_digest(model.module)
        result = _named_failure(p, "the torch model", lambda: p.apply(model, cfg, self._torch_ctx))
        out: TorchModel = result.model
        record = TorchStep(
            step=Step(
                name=p.step_name,
                config=cfg.model_dump(mode="json"),
                duration_s=time.perf_counter() - started,
                input_sha256=before,
            ),
            output_sha256=weights_digest(out.module),
            at=datetime.now(UTC),
            resolved=dict(result.resolved),
            metrics=dict(result.metrics),
        )
        return TorchModel(out.module, out.example_inputs, (*model.steps, record), key)

    # -- anything → bundle (export, import) ----------------------------------------------------------
    def bundle_key(self, p: AnyPass, input_fingerprint: str, config: PassConfig, name: str) -> str:
        return PassCache.key(input_fingerprint, p.step_name, sha256_json([p.config_hash(config), name]))

    def run_to_bundle(
        self,
        p: AnyPass,
        model: Callable[[], Any],
        input_fingerprint: str,
        output: str | Path,
        config: PassConfig | None = None,
        *,
        name: str,
        overwrite: bool = False,
    ) -> PassRun:
        """Run a pass whose ``apply`` writes a bundle (export, import); ``model()`` gives its input, and is
        only called on a cache miss. Steps the input carries (torch passes) go into the lineage first."""
        cfg = config if config is not None else p.make_config()
        key = self.bundle_key(p, input_fingerprint, cfg, name)
        started = time.perf_counter()
        hit = self.cache.get_bundle(key, p.name) if self.cache is not None else None
        target = Path(output)
        if hit is not None:
            proto, manifest = hit
            written = write_bundle(target, proto, manifest, overwrite=overwrite)
        else:
            source = model()
            target.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(prefix=f".{target.name}.{p.name}-", dir=target.parent) as tmp:
                ctx = BundleContext(workdir=Path(tmp), name=name)
                made: Bundle = _named_failure(p, name, lambda: p.apply(source, cfg, ctx))
                steps = source.steps if isinstance(source, TorchModel) else ()
                written = write_bundle(
                    target, made.load_model(), _with_steps(made.manifest, steps), overwrite=overwrite
                )
            if self.cache is not None:
                self.cache.put_bundle(key, p.name, written)
        return PassRun(
            bundle=written,
            step=p.step_name,
            duration_s=time.perf_counter() - started,
            cache_hit=hit is not None,
            warnings=(),
        )

    # -- a whole recipe ------------------------------------------------------------------------------
    def run_chain(
        self,
        steps: Sequence[PlannedStep],
        source: Bundle | TorchModel,
        output: str | Path,
        *,
        name: str = "model",
        overwrite: bool = False,
        progress: Progress | None = None,
    ) -> ChainRun:
        """Run planned steps (recipe.plan) from ``source`` and write the last result to ``output``.

        Steps chain by kind: [torch passes] → export → [ONNX passes]. The torch passes run only when the
        export after them is not cached: their fingerprints are known before any of them runs.
        """
        from slipstream.passes.recipe import ProgressEvent

        def tell(i: int, step: str, run: PassRun | None = None) -> None:
            if progress is not None:
                progress(ProgressEvent(i, len(steps), step, run))

        target = Path(output)
        target.parent.mkdir(parents=True, exist_ok=True)
        hits = 0
        with tempfile.TemporaryDirectory(prefix=f".{target.name}.steps-", dir=target.parent) as tmp:
            current: Bundle | TorchModel = source
            i = 0
            if isinstance(source, TorchModel):
                n_torch = next((k for k, (_, p, _) in enumerate(steps) if p.output_kind != "torch"), len(steps))
                fp = fingerprint(source)
                for _, p, cfg in steps[:n_torch]:
                    fp = self.torch_key(p, fp, cfg)
                fp = sha256_json([fp, _examples_signature(source.example_inputs)])  # they shape the export
                if n_torch == len(steps):
                    raise PassError("A torch recipe must end in an export step.", pass_name=steps[-1][1].name)
                _, exporter, export_cfg = steps[n_torch]

                def trained() -> TorchModel:
                    model: TorchModel = source  # narrowed above
                    for k, (_, p, cfg) in enumerate(steps[:n_torch]):
                        tell(k, p.step_name)
                        model = self.run_torch(p, model, cfg)
                    return model

                last = n_torch == len(steps) - 1
                dest = target if last else Path(tmp) / "exported"
                run = self.run_to_bundle(
                    exporter, trained, fp, dest, export_cfg, name=name, overwrite=overwrite if last else True
                )
                if run.cache_hit:
                    hits += n_torch + 1
                    for k, (_, p, _) in enumerate(steps[:n_torch]):
                        tell(k, p.step_name)
                tell(n_torch, exporter.step_name)
                current, i = run.bundle, n_torch + 1
            for k in range(i, len(steps)):
                _, p, cfg = steps[k]
                tell(k, p.step_name)
                last = k == len(steps) - 1
                dest = target if last else Path(tmp) / f"{k:02d}-{p.name}"
                if not isinstance(current, Bundle):  # recipe.check_order puts an export before ONNX passes
                    raise PassError(
                        f"{p.step_name} needs a bundle; the recipe has no export before it.", pass_name=p.name
                    )
                run = self.run_onnx(p, current, dest, cfg, overwrite=overwrite if last else True)
                hits += run.cache_hit
                tell(k, p.step_name, run)
                if not last and current is not source:
                    shutil.rmtree(current.path, ignore_errors=True)  # drop each intermediate once the next exists
                current = run.bundle
        if not isinstance(current, Bundle):
            raise PassError("A recipe must end with a bundle.", pass_name=steps[-1][1].name)
        return ChainRun(bundle=current, steps=len(steps), cache_hits=hits)


def _examples_signature(examples: Sequence[Any]) -> list[str]:
    """Shape and dtype of each example input (what the exporter traces with)."""
    return [f"{tuple(getattr(x, 'shape', ()))}:{getattr(x, 'dtype', type(x).__name__)}" for x in examples]


def _with_steps(manifest: Manifest, steps: Sequence[TorchStep]) -> Manifest:
    """The importer's manifest with the torch steps before it as lineage (and their resolved/metrics)."""
    resolved = dict(manifest.resolved)
    metrics = dict(manifest.metrics)
    for s in steps:
        resolved[s.step.name] = s.resolved
        metrics[s.step.name] = s.metrics
    lineage = (*(s.lineage_entry() for s in steps), *manifest.lineage)
    return manifest.model_copy(update={"lineage": lineage, "resolved": resolved, "metrics": metrics})


def _named_failure(p: AnyPass, what: str, work: Callable[[], Any]) -> Any:
    """Run ``work``; a third-party exception becomes a PassError that names the pass (ours pass through)."""
    try:
        return work()
    except SlipstreamError:
        raise
    except Exception as exc:  # third-party tools raise anything; name the pass and keep the cause
        raise PassError(
            f"Pass {p.step_name} failed on {what}: {type(exc).__name__}: {exc}",
            pass_name=p.name,
            hint="Check the pass options against the model.",
        ) from exc


__all__ = ["BundleContext", "ChainRun", "PassRunner", "fingerprint"]
