from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx.external_data_helper import set_external_data
from pydantic import ValidationError

from slipstream.artifact import SCHEMA_VERSION, Bundle, Manifest, Source, Step, TensorSpec, write_bundle
from slipstream.artifact.bundle import EXTERNAL_DATA_FILE, MANIFEST_FILE, MODEL_FILE
from slipstream.artifact.publish import publish_bundle
from slipstream.errors import BundleError, BundleExistsError, BundleNotFoundError, IntegrityError, SchemaError
from slipstream.runtime import Engine
from tests.onnx_models import build_mlp


def _manifest(name: str = "m") -> Manifest:
    return Manifest(
        name=name,
        source=Source(framework="onnx"),
        inputs=(TensorSpec(name="pixels", dtype="float32", shape=("batch", 8)),),
        outputs=(TensorSpec(name="probabilities", dtype="float32", shape=("batch", 4)),),
    )


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def test_round_trip_records_every_file_and_the_step(tmp_path: Path) -> None:
    step = Step(name="import.onnx@1", config={"source": "x.onnx"}, duration_s=0.5, input_sha256="ab" * 32)
    written = write_bundle(tmp_path / "b", build_mlp((8, 16, 4)), _manifest(), step=step)
    loaded = Bundle.load(tmp_path / "b")
    assert loaded.manifest == written.manifest
    assert set(loaded.manifest.files) == {MODEL_FILE}
    assert loaded.manifest.schema_version == SCHEMA_VERSION
    (entry,) = loaded.manifest.lineage
    assert entry.step == "import.onnx@1"
    assert entry.output_sha256 == loaded.manifest.files[MODEL_FILE].sha256 == loaded.model_sha256
    assert entry.input_sha256 == "ab" * 32


def test_manifest_is_frozen_and_rejects_unknown_fields() -> None:
    m = _manifest()
    with pytest.raises(ValidationError):
        m.name = "other"  # type: ignore[misc]
    with pytest.raises(ValidationError):
        Manifest.model_validate({**m.model_dump(), "surprise": 1})


def test_tensor_spec_dtype_is_a_closed_set() -> None:
    with pytest.raises(ValidationError):
        TensorSpec(name="x", dtype="float31", shape=(1,))  # type: ignore[arg-type]
    spec = TensorSpec(name="x", dtype="int64", shape=("batch", "seq", 3))
    assert spec.dynamic_axes == (0, 1)


def test_refuses_to_overwrite_unless_asked(tmp_path: Path) -> None:
    write_bundle(tmp_path / "b", build_mlp((8, 16, 4)), _manifest("first"))
    with pytest.raises(BundleExistsError, match="already exists"):
        write_bundle(tmp_path / "b", build_mlp((8, 16, 4)), _manifest("second"))
    write_bundle(tmp_path / "b", build_mlp((8, 16, 4)), _manifest("second"), overwrite=True)
    assert Bundle.load(tmp_path / "b").manifest.name == "second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


def test_a_crash_mid_write_leaves_the_old_bundle_and_no_debris(tmp_path: Path) -> None:
    write_bundle(tmp_path / "b", build_mlp((8, 16, 4)), _manifest("good"))
    before = sorted(p.name for p in (tmp_path / "b").iterdir())

    class BoomError(Exception):
        pass

    class ExplodingFiles(dict[str, bytes]):
        def items(self):  # type: ignore[no-untyped-def]
            yield "notes.txt", b"partial"
            raise BoomError  # the process dies half-way through writing side files

    with pytest.raises(BoomError):
        write_bundle(
            tmp_path / "b",
            build_mlp((8, 16, 4)),
            _manifest("bad"),
            extra_files=ExplodingFiles({"notes.txt": b""}),
            overwrite=True,
        )
    assert Bundle.load(tmp_path / "b").manifest.name == "good"
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


def test_a_crash_on_first_write_leaves_nothing(tmp_path: Path) -> None:
    bad_model = onnx.ModelProto()
    bad_model.graph.name = "x"
    with pytest.raises(ValidationError):
        # An invalid manifest update is caught before the rename, so no bundle appears.
        write_bundle(tmp_path / "b", bad_model, _manifest().model_copy(update={"name": ""}))
    assert list(tmp_path.iterdir()) == []


def test_flipped_byte_is_an_integrity_error_naming_the_file(bundle_copy: Path) -> None:
    _flip_byte(bundle_copy / MODEL_FILE)
    with pytest.raises(IntegrityError) as info:
        Bundle.load(bundle_copy)
    assert info.value.file == MODEL_FILE
    assert "model.onnx" in str(info.value) and "sha256" in str(info.value)


def test_truncated_file_is_an_integrity_error(bundle_copy: Path) -> None:
    data = (bundle_copy / MODEL_FILE).read_bytes()
    (bundle_copy / MODEL_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(IntegrityError, match="bytes"):
        Bundle.load(bundle_copy)


def test_missing_and_unlisted_files_are_reported_together(bundle_copy: Path) -> None:
    (bundle_copy / MODEL_FILE).unlink()
    (bundle_copy / "sneaky.py").write_text("print('hi')")
    with pytest.raises(IntegrityError) as info:
        Bundle.load(bundle_copy)
    message = str(info.value)
    assert "'model.onnx' is missing" in message
    assert "'sneaky.py' is not listed" in message


def test_verify_false_skips_hashing(bundle_copy: Path) -> None:
    _flip_byte(bundle_copy / MODEL_FILE)
    assert Bundle.load(bundle_copy, verify=False).manifest.name == "mlp"


def test_damaged_manifest(bundle_copy: Path) -> None:
    (bundle_copy / MANIFEST_FILE).write_text("{not json")
    with pytest.raises(IntegrityError, match="not valid JSON"):
        Bundle.load(bundle_copy)


def test_manifest_from_a_newer_slipstream(bundle_copy: Path) -> None:
    raw = json.loads((bundle_copy / MANIFEST_FILE).read_text())
    raw["schema_version"] = SCHEMA_VERSION + 1
    (bundle_copy / MANIFEST_FILE).write_text(json.dumps(raw))
    with pytest.raises(SchemaError, match="Upgrade slipstream"):
        Bundle.load(bundle_copy)


def test_manifest_with_wrong_field_types_names_the_field(bundle_copy: Path) -> None:
    raw = json.loads((bundle_copy / MANIFEST_FILE).read_text())
    raw["inputs"][0]["dtype"] = "complex64"
    (bundle_copy / MANIFEST_FILE).write_text(json.dumps(raw))
    with pytest.raises(SchemaError, match=r"inputs\.0\.dtype"):
        Bundle.load(bundle_copy)


def test_not_a_bundle(tmp_path: Path, mlp_onnx: Path) -> None:
    with pytest.raises(BundleNotFoundError, match="does not exist"):
        Bundle.load(tmp_path / "nope")
    with pytest.raises(BundleNotFoundError, match=r"no manifest\.json"):
        Bundle.load(tmp_path)
    with pytest.raises(BundleError, match="got a file"):
        Bundle.load(mlp_onnx)


def test_large_models_are_written_with_external_data(tmp_path: Path) -> None:
    big = build_mlp((8, 256, 4))  # tensors of 1 KiB and more go to the side file
    bundle = write_bundle(tmp_path / "b", big, _manifest(), external_data_threshold_bytes=1)
    assert set(bundle.manifest.files) == {MODEL_FILE, EXTERNAL_DATA_FILE}
    loaded = Bundle.load(tmp_path / "b")
    assert loaded.model_sha256 != loaded.manifest.files[MODEL_FILE].sha256
    _flip_byte(tmp_path / "b" / EXTERNAL_DATA_FILE)
    with pytest.raises(IntegrityError) as info:
        Bundle.load(tmp_path / "b")
    assert info.value.file == EXTERNAL_DATA_FILE


def test_the_writer_does_not_modify_the_model(tmp_path: Path) -> None:
    model = build_mlp((8, 16, 4))
    before = model.SerializeToString()
    write_bundle(tmp_path / "b", model, _manifest(), external_data_threshold_bytes=1)
    assert model.SerializeToString() == before
    shutil.rmtree(tmp_path / "b")


# -- containment: a bundle holds its own regular files and nothing else -----------------------------------


def _list_in_manifest(bundle: Path, name: str, content: bytes) -> None:
    """Record ``name`` in the manifest with the right digest, as an attacker editing the bundle would."""
    raw = json.loads((bundle / MANIFEST_FILE).read_text())
    raw["files"][name] = {"sha256": hashlib.sha256(content).hexdigest(), "size_bytes": len(content)}
    (bundle / MANIFEST_FILE).write_text(json.dumps(raw))


def test_model_symlinked_to_an_outside_file_is_refused(bundle_copy: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside.onnx"
    shutil.move(bundle_copy / MODEL_FILE, outside)  # same bytes, same digest: only the place is wrong
    (bundle_copy / MODEL_FILE).symlink_to(outside)
    with pytest.raises(IntegrityError) as info:
        Bundle.load(bundle_copy)
    assert info.value.file == MODEL_FILE
    assert "'model.onnx' is a symbolic link" in str(info.value)
    assert "replace symlinks" in str(info.value)


def test_extra_file_symlinked_to_etc_passwd_is_refused(bundle_copy: Path) -> None:
    _list_in_manifest(bundle_copy, "labels.txt", Path("/etc/passwd").read_bytes())
    (bundle_copy / "labels.txt").symlink_to("/etc/passwd")
    with pytest.raises(IntegrityError) as info:
        Bundle.load(bundle_copy)
    assert info.value.file == "labels.txt"
    assert "'labels.txt' is a symbolic link" in str(info.value)


def test_unlisted_symlink_is_refused_with_its_target(bundle_copy: Path) -> None:
    (bundle_copy / "signature").symlink_to("/etc/passwd")  # a name the manifest may leave out
    with pytest.raises(IntegrityError, match=r"'signature' is a symbolic link \(to '/etc/passwd'\)"):
        Bundle.load(bundle_copy)


@pytest.mark.parametrize("entry", ["../../../../../etc/passwd", "/etc/passwd", "..", "sub/file"])
def test_manifest_entry_outside_the_bundle_is_refused(bundle_copy: Path, entry: str) -> None:
    content = Path("/etc/passwd").read_bytes() if "passwd" in entry else b""
    _list_in_manifest(bundle_copy, entry, content)
    with pytest.raises(IntegrityError) as info:
        Bundle.load(bundle_copy)
    assert info.value.file == entry
    assert entry in str(info.value)


def test_symlinked_manifest_is_refused(bundle_copy: Path, tmp_path: Path) -> None:
    shutil.move(bundle_copy / MANIFEST_FILE, tmp_path / "manifest.json")
    (bundle_copy / MANIFEST_FILE).symlink_to(tmp_path / "manifest.json")
    with pytest.raises(IntegrityError, match=r"'manifest\.json' is a symbolic link"):
        Bundle.load(bundle_copy, verify=False)


def test_a_fifo_is_refused_without_blocking(bundle_copy: Path) -> None:
    _list_in_manifest(bundle_copy, "pipe", b"")
    os.mkfifo(bundle_copy / "pipe")
    with pytest.raises(IntegrityError, match="'pipe' is not a regular file"):
        Bundle.load(bundle_copy)


def test_external_data_symlink_is_refused(tmp_path: Path) -> None:
    write_bundle(tmp_path / "b", build_mlp((8, 256, 4)), _manifest(), external_data_threshold_bytes=1)
    shutil.move(tmp_path / "b" / EXTERNAL_DATA_FILE, tmp_path / "weights")
    (tmp_path / "b" / EXTERNAL_DATA_FILE).symlink_to(tmp_path / "weights")
    with pytest.raises(IntegrityError) as info:
        Bundle.load(tmp_path / "b")
    assert info.value.file == EXTERNAL_DATA_FILE


def test_external_data_pointing_outside_the_bundle_is_refused(bundle_copy: Path) -> None:
    model = onnx.load(str(bundle_copy / MODEL_FILE))
    weight = model.graph.initializer[0]
    set_external_data(weight, location="../weights.bin", offset=0, length=len(weight.raw_data))
    weight.ClearField("raw_data")
    weight.data_location = onnx.TensorProto.EXTERNAL
    (bundle_copy / MODEL_FILE).write_bytes(model.SerializeToString())
    _list_in_manifest(bundle_copy, MODEL_FILE, (bundle_copy / MODEL_FILE).read_bytes())
    bundle = Bundle.load(bundle_copy)  # every listed file matches; only what model.onnx points at is wrong
    for load in (bundle.read_model_bytes, bundle.load_model, lambda: Engine(bundle)):
        with pytest.raises(IntegrityError) as info:
            load()
        assert info.value.file == "../weights.bin"
        assert "external data only in its own listed model.onnx.data" in str(info.value)


def test_what_is_checked_is_what_is_loaded(bundle_copy: Path, tmp_path: Path) -> None:
    bundle = Bundle.load(bundle_copy)  # verified now ...
    swapped = tmp_path / "swapped.onnx"
    shutil.copy(bundle_copy / MODEL_FILE, swapped)
    _flip_byte(swapped)  # a different model of the same size ...
    swapped.replace(bundle_copy / MODEL_FILE)  # ... put in place after the check
    with pytest.raises(IntegrityError, match="sha256"):
        Engine(bundle)
    with pytest.raises(IntegrityError, match="sha256"):
        bundle.load_model()


def test_a_bundle_with_external_data_loads_and_runs_from_memory(tmp_path: Path) -> None:
    model = build_mlp((8, 256, 4))
    external = Bundle.load(write_bundle(tmp_path / "ext", model, _manifest(), external_data_threshold_bytes=1).path)
    inline = Bundle.load(write_bundle(tmp_path / "inline", model, _manifest()).path)
    assert external.manifest.files.keys() == {MODEL_FILE, EXTERNAL_DATA_FILE}
    x = np.random.default_rng(0).random((3, 8), dtype=np.float32)
    np.testing.assert_array_equal(
        Engine(external).run({"pixels": x})["probabilities"], Engine(inline).run({"pixels": x})["probabilities"]
    )
    loaded = external.load_model()
    assert loaded.SerializeToString() == inline.load_model().SerializeToString()


def test_publish_copies_a_verified_bundle_into_place_in_one_rename(bundle_copy: Path, tmp_path: Path) -> None:
    (bundle_copy / "signature").write_bytes(b"sig")  # an unlisted signature travels with the manifest
    published = publish_bundle(bundle_copy, tmp_path / "repo" / "mlp" / "3")
    assert sorted(p.name for p in published.path.iterdir()) == sorted(p.name for p in bundle_copy.iterdir())
    assert (published.path / MANIFEST_FILE).read_bytes() == (bundle_copy / MANIFEST_FILE).read_bytes()
    assert sorted(p.name for p in (tmp_path / "repo" / "mlp").iterdir()) == ["3"]  # no temporary left behind
    with pytest.raises(BundleExistsError, match="already exists"):
        publish_bundle(bundle_copy, published.path)


def test_publish_refuses_a_source_changed_after_it_was_checked(bundle_copy: Path, tmp_path: Path) -> None:
    source = Bundle.load(bundle_copy)
    _flip_byte(bundle_copy / MODEL_FILE)
    with pytest.raises(IntegrityError, match="sha256"):
        publish_bundle(source, tmp_path / "repo" / "mlp" / "3")
    assert list((tmp_path / "repo" / "mlp").iterdir()) == []
