"""The build's spinning choice (resolved["session"]["intra_op_spinning"]) reaches onnxruntime's session."""

from __future__ import annotations

from pathlib import Path

import pytest

from slipstream.artifact import Bundle
from slipstream.artifact.bundle import write_bundle
from slipstream.runtime import Engine, Target

SPIN = "session.intra_op.allow_spinning"


def _with_session(bundle: Bundle, dest: Path, session: dict[str, object]) -> Bundle:
    resolved = {**bundle.manifest.resolved, "session": session}
    return write_bundle(dest, bundle.load_model(), bundle.manifest.model_copy(update={"resolved": resolved}))


def test_a_bundle_that_chose_no_spinning_runs_without_it(mlp_bundle: Bundle, tmp_path: Path) -> None:
    tuned = _with_session(mlp_bundle, tmp_path / "b", {"intra_op_threads": 2, "intra_op_spinning": False})
    engine = Engine(tuned)
    assert engine.session.get_session_options().get_session_config_entry(SPIN) == "0"
    assert "intra_op_spinning" in engine.resolved().from_bundle
    # The caller's own setting wins over the bundle's.
    mine = Engine(tuned, Target(intra_op_spinning=True))
    assert mine.session.get_session_options().get_session_config_entry(SPIN) == "1"
    assert "intra_op_spinning" not in mine.resolved().from_bundle


def test_without_a_choice_onnxruntime_keeps_its_default(mlp_bundle: Bundle) -> None:
    options = Engine(mlp_bundle).session.get_session_options()
    with pytest.raises(RuntimeError, match="does not have configuration"):
        options.get_session_config_entry(SPIN)
