from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from slipstream.artifact import TensorSpec
from slipstream.data.datasets import Dataset, check_dataset, load_dataset, precheck_data
from slipstream.data.synthetic import DEFAULT_INT_RANGE, example_inputs
from slipstream.errors import ConfigError, DataError

PIXELS = TensorSpec(name="pixels", dtype="float32", shape=("batch", 4))
IDS = TensorSpec(name="input_ids", dtype="int64", shape=("batch", "seq"))


def _rows(n: int = 10) -> np.ndarray:
    return np.arange(n * 4, dtype=np.float64).reshape(n, 4)


def test_npz_with_labels(tmp_path: Path) -> None:
    path = tmp_path / "d.npz"
    np.savez(path, pixels=_rows(), labels=np.arange(10) % 3)
    ds = load_dataset(path, [PIXELS])
    assert len(ds) == 10 and ds.inputs["pixels"].dtype == np.float32
    assert ds.labels is not None and list(ds.labels[:3]) == [0, 1, 2]
    batches = list(ds.batches(4))
    assert [len(b["pixels"]) for b, _ in batches] == [4, 4, 2]
    assert [len(lab) for _, lab in batches if lab is not None] == [4, 4, 2]


def test_npz_wrong_names_shapes_and_label_count(tmp_path: Path) -> None:
    path = tmp_path / "d.npz"
    np.savez(path, image=_rows())
    with pytest.raises(
        DataError, match=r"expected arrays named \['pixels'\].*missing \['pixels'\]; unexpected \['image'\]"
    ):
        load_dataset(path, [PIXELS])
    np.savez(path, pixels=np.zeros((10, 5)))
    with pytest.raises(DataError, match=r"must have shape \[batch, 4\]; got \[10, 5\]"):
        load_dataset(path, [PIXELS])
    np.savez(path, pixels=_rows(), labels=np.zeros(9))
    with pytest.raises(DataError, match="'labels' has 9 rows; the inputs have 10"):
        load_dataset(path, [PIXELS])
    np.savez(path, pixels=np.full((10, 4), "x"))
    with pytest.raises(DataError, match="must be float32; got <U1"):
        load_dataset(path, [PIXELS])


def test_csv_and_parquet_tables(tmp_path: Path) -> None:
    header = "a,b,c,d,labels\n"
    body = "".join(f"{r[0]},{r[1]},{r[2]},{r[3]},{i % 2}\n" for i, r in enumerate(_rows(6)))
    (tmp_path / "d.csv").write_text(header + body)
    ds = load_dataset(tmp_path / "d.csv", [PIXELS])
    np.testing.assert_array_equal(ds.inputs["pixels"], _rows(6).astype(np.float32))
    assert ds.labels is not None and list(ds.labels) == [0, 1, 0, 1, 0, 1]

    table = pa.table({"x1": [1.0, 2.0], "x2": [3.0, 4.0], "x3": [0.0, 0.0], "x4": [1.0, 1.0], "y": [1, 0]})
    pq.write_table(table, tmp_path / "d.parquet")
    ds = load_dataset(tmp_path / "d.parquet", [PIXELS], label_column="y")
    assert ds.inputs["pixels"].tolist() == [[1, 3, 0, 1], [2, 4, 0, 1]]
    with pytest.raises(DataError, match=r"columns \['nope'\]"):
        load_dataset(tmp_path / "d.parquet", [PIXELS], columns={"pixels": ["nope"]}, label_column="y")


def test_callable_source(tmp_path: Path) -> None:
    script = tmp_path / "gen.py"
    script.write_text(
        "import numpy as np\n"
        "def batches():\n"
        "    for i in range(3):\n"
        "        yield {'input_ids': np.full((2, 5), i), 'labels': np.array([i, i])}\n"
        "def broken():\n"
        "    return [np.zeros(3)]\n"
    )
    ds = load_dataset(f"{script}:batches", [IDS])
    assert ds.inputs["input_ids"].shape == (6, 5)
    assert ds.labels is not None and ds.labels.tolist() == [0, 0, 1, 1, 2, 2]
    with pytest.raises(DataError, match="batch 0 is a ndarray; expected a dict"):
        load_dataset(f"{script}:broken", [IDS])
    with pytest.raises(ConfigError, match="has no attribute 'nope'"):
        load_dataset(f"{script}:nope", [IDS])


def test_unknown_format_and_missing_file(tmp_path: Path) -> None:
    (tmp_path / "d.txt").write_text("1,2")
    with pytest.raises(DataError, match=r"expected \.npz, \.csv, \.parquet"):
        load_dataset(tmp_path / "d.txt", [PIXELS])
    with pytest.raises(DataError, match="No data file"):
        load_dataset(tmp_path / "missing.npz", [PIXELS])


def test_rows_must_agree_and_take() -> None:
    with pytest.raises(DataError, match="has 3 rows; the other inputs have 2"):
        check_dataset(
            {"a": np.zeros((2, 4)), "b": np.zeros((3, 4))},
            None,
            [PIXELS.model_copy(update={"name": "a"}), PIXELS.model_copy(update={"name": "b"})],
            "test",
        )
    ds = Dataset({"pixels": _rows(5)}, np.arange(5))
    assert len(ds.take(2)) == 2 and ds.take(2).labels is not None


def test_generated_inputs_follow_the_inputs_meaning() -> None:
    """Masks are ones; integers stay in their recorded range (token ids below the vocabulary size)."""
    ids = IDS.model_copy(update={"value_range": (0.0, 29.0)})
    mask = TensorSpec(name="attention_mask", dtype="int64", shape=("batch", "seq"))
    other = TensorSpec(name="bucket", dtype="int32", shape=("batch",))
    feeds = example_inputs([ids, mask, other], 64, dims={"seq": 16}, seed=3)
    assert feeds["input_ids"].min() >= 0 and feeds["input_ids"].max() == 29  # the whole range is used
    assert feeds["attention_mask"].dtype == np.int64 and np.all(feeds["attention_mask"] == 1)
    assert feeds["bucket"].min() >= DEFAULT_INT_RANGE[0] and feeds["bucket"].max() <= DEFAULT_INT_RANGE[1]


def test_recipe_data_problems_are_found_before_any_model_work(tmp_path: Path) -> None:
    np.savez(tmp_path / "eval.npz", input_ids=np.zeros((4, 8), np.int64))
    np.savez(tmp_path / "calib.npz", tokens=np.zeros((4, 8), np.int64))
    with pytest.raises(DataError, match=r"data.eval: no data file at '.*missing.npz'"):
        precheck_data({"data.eval": str(tmp_path / "missing.npz")})
    with pytest.raises(DataError, match=r"data.eval: metric 'accuracy' compares with labels, but .* no 'labels'"):
        precheck_data({"data.eval": str(tmp_path / "eval.npz")}, labels_for="metric 'accuracy' compares with labels")
    with pytest.raises(DataError, match=r"name different inputs .*data.eval: \['input_ids'\]; data.calibration"):
        precheck_data({"data.eval": str(tmp_path / "eval.npz"), "data.calibration": str(tmp_path / "calib.npz")})
    precheck_data({"data.eval": str(tmp_path / "eval.npz"), "data.train": None})  # label-free: nothing to refuse
