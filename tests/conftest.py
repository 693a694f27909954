"""Shared fixtures: real ONNX files and bundles, built once per session."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import onnx
import pytest

from slipstream.artifact import Bundle
from slipstream.importers import import_onnx
from tests.onnx_models import build_mlp, build_token_scorer
from tests.pg_support import PostgresCluster


@pytest.fixture(scope="session", autouse=True)
def _private_pass_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Keep the pass cache of a test session out of the user's cache directory."""
    os.environ["SLIPSTREAM_CACHE_DIR"] = str(tmp_path_factory.mktemp("pass-cache"))


@pytest.fixture(scope="module")
def torch_one_thread() -> Iterator[None]:
    """Tiny torch models on a shared 2-core machine train several times faster on one thread (restored after).

    A module that trains them asks for it with ``pytestmark = pytest.mark.usefixtures("torch_one_thread")``."""
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def mlp_onnx(models_dir: Path) -> Path:
    path = models_dir / "mlp.onnx"
    onnx.save_model(build_mlp((8, 16, 4)), str(path))
    return path


@pytest.fixture(scope="session")
def scorer_onnx(models_dir: Path) -> Path:
    path = models_dir / "scorer.onnx"
    onnx.save_model(build_token_scorer(), str(path))
    return path


@pytest.fixture(scope="session")
def mlp_bundle_dir(mlp_onnx: Path, models_dir: Path) -> Path:
    """A bundle shared by read-only tests; tests that change files use ``bundle_copy``."""
    return import_onnx(mlp_onnx, models_dir / "mlp-bundle").path


@pytest.fixture(scope="session")
def mlp_bundle(mlp_bundle_dir: Path) -> Bundle:
    return Bundle.load(mlp_bundle_dir)


@pytest.fixture(scope="session")
def built_bundle_dir(mlp_onnx: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The winner of a real `build` of the MLP (baseline only, a short timing): model.onnx, manifest.json,
    profile.json and sbom.cdx.json, as every build packages them. Read-only: copy it to change it."""
    import numpy as np

    from slipstream.build.recipe import parse_recipe
    from slipstream.build.search import run_build

    work = tmp_path_factory.mktemp("built")
    rng = np.random.default_rng(0)
    pixels = rng.standard_normal((256, 8)).astype(np.float32)
    np.savez(work / "eval.npz", pixels=pixels, labels=rng.integers(0, 4, len(pixels)))
    recipe = {
        "name": "mlp", "model": str(mlp_onnx), "data": {"eval": str(work / "eval.npz")},
        "budget": {"max_accuracy_drop": 0.01}, "batch_size": 8, "bench_time_s": 0.1, "output": str(work / "out"),
        "candidates": [],
    }  # fmt: skip
    return run_build(parse_recipe(recipe)).winner.path


@pytest.fixture
def bundle_copy(mlp_bundle_dir: Path, tmp_path: Path) -> Path:
    dest = tmp_path / "bundle"
    shutil.copytree(mlp_bundle_dir, dest)
    return dest


@pytest.fixture(scope="session")
def postgres_cluster() -> Iterator[PostgresCluster]:
    """A throwaway PostgreSQL cluster for the session (tests/pg_support.py); restartable for fault tests.

    Never skipped: when PostgreSQL cannot start, the fixture raises and the error says why."""
    cluster = PostgresCluster()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.destroy()


@pytest.fixture(scope="session")
def postgres_dsn(postgres_cluster: PostgresCluster) -> str:
    """``postgresql://postgres@127.0.0.1:PORT/slipstream`` of the session's cluster."""
    return postgres_cluster.dsn
