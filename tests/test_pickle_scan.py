"""Pickles inside PyTorch files are checked before torch unpickles them, trusted or not."""

from __future__ import annotations

import io
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch

from slipstream.errors import UntrustedPickleError
from slipstream.importers.pickle_scan import COMPUTED, pickle_globals
from slipstream.importers.torch_sources import load_torch_source
from tests.torch_models import CNN, MLP

SYSTEM = f"{os.system.__module__}.system"


class Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return os.system, (f"touch {self.marker}",)


class CarriesEvil(torch.nn.Module):
    """A real module with a payload in an attribute: what a crafted 'whole model' file looks like."""

    def __init__(self, marker: Path) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(8, 4)
        self.note = Evil(marker)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_a_pickled_whole_model_with_a_payload_is_refused_even_when_trusted(tmp_path: Path, zip_format: bool) -> None:
    marker = tmp_path / "MARKER"
    torch.save(CarriesEvil(marker), tmp_path / "whole.pt", _use_new_zipfile_serialization=zip_format)
    with pytest.raises(UntrustedPickleError) as info:
        load_torch_source(str(tmp_path / "whole.pt"), trust_pickle=True)
    assert SYSTEM in info.value.message and "whole.pt" in info.value.message
    assert not marker.exists()


def test_a_trusted_whole_model_of_real_layers_still_loads(tmp_path: Path) -> None:
    for module, zip_format in ((MLP(), True), (CNN(), True), (MLP(), False)):
        torch.save(module, tmp_path / "whole.pt", _use_new_zipfile_serialization=zip_format)
        loaded = load_torch_source(str(tmp_path / "whole.pt"), trust_pickle=True)
        assert loaded.kind == "pickle" and type(loaded.model) is type(module)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("pt2") / "mlp.pt2"
    torch.export.save(torch.export.export(MLP().eval(), (torch.randn(2, 8),)), str(path))
    return path


def _with_member_replaced(source: Path, dest: Path, suffix: str, content: bytes) -> Path:
    with zipfile.ZipFile(source) as src, zipfile.ZipFile(dest, "w") as out:
        names = [i.filename for i in src.infolist()]
        assert any(n.endswith(suffix) for n in names), names
        for info in src.infolist():
            out.writestr(info, content if info.filename.endswith(suffix) else src.read(info))
    return dest


def test_a_pt2_archive_with_a_pickled_payload_is_refused_without_running_it(exported: Path, tmp_path: Path) -> None:
    """torch.export.load unpickles sample inputs with weights_only=False as a fallback: a crafted archive
    would run code with no --trust-pickle at all."""
    marker = tmp_path / "MARKER"
    payload = io.BytesIO()
    torch.save(Evil(marker), payload)
    evil = _with_member_replaced(exported, tmp_path / "evil.pt2", "sample_inputs/model.pt", payload.getvalue())
    for trust in (False, True):
        with pytest.raises(UntrustedPickleError) as info:
            load_torch_source(str(evil), trust_pickle=trust)
        assert SYSTEM in info.value.message and "sample_inputs/model.pt" in info.value.message
    assert not marker.exists()


def test_a_clean_pt2_archive_still_loads(exported: Path) -> None:
    assert load_torch_source(str(exported), trust_pickle=False).kind == "exported_program"


def test_the_static_scan_finds_every_way_to_name_a_global() -> None:
    for protocol in range(6):
        names, end = pickle_globals(pickle.dumps([Evil(Path("m")), {1, 2}], protocol=protocol))
        assert (os.system.__module__, "system") in names and end > 0
    # A STACK_GLOBAL whose module name was computed (str('os')) is reported as such, never guessed.
    computed = b"\x80\x04cbuiltins\nstr\n\x8c\x02os\x85R\x8c\x06system\x93."
    assert pickle_globals(computed)[0] == [("builtins", "str"), (COMPUTED, "")]
    # Names reached through the memo are followed.
    memoized = b"\x80\x04\x8c\x05posix\x94\x8c\x06system\x94h\x00h\x01\x93."
    assert pickle_globals(memoized)[0] == [("posix", "system")]
    with pytest.raises(ValueError, match="not a pickle"):
        pickle_globals(b"\x80\x04\xff")
