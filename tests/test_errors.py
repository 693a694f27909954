from __future__ import annotations

import inspect

import pytest

import slipstream.errors as errors
from slipstream.errors import InputError, IntegrityError, MissingDependencyError, SlipstreamError


def _error_classes() -> list[type[BaseException]]:
    return [obj for _, obj in inspect.getmembers(errors, inspect.isclass) if issubclass(obj, BaseException)]


def test_every_error_is_rooted_in_slipstream_error() -> None:
    classes = _error_classes()
    assert len(classes) >= 10
    for cls in classes:
        assert issubclass(cls, SlipstreamError), cls


def test_every_error_class_is_drawn_in_the_module_docstring() -> None:
    doc = errors.__doc__ or ""
    for cls in _error_classes():
        assert cls.__name__ in doc, f"{cls.__name__} missing from the tree in errors.py"


def test_client_errors_carry_status_codes() -> None:
    assert InputError("x").status_code == 400
    assert errors.BundleNotFoundError("x", path="p").status_code == 404
    assert errors.EngineError("x").status_code is None


def test_message_and_hint_are_both_shown() -> None:
    exc = IntegrityError("model.onnx changed", path="/b", file="model.onnx", hint="rebuild it")
    assert str(exc) == "model.onnx changed\n  hint: rebuild it"
    assert exc.file == "model.onnx"
    assert str(exc.path) == "/b"


def test_missing_dependency_names_the_extra() -> None:
    exc = MissingDependencyError("torch", extra="torch", feature="Converting a PyTorch model")
    assert "pip install 'slipstream[torch]'" in str(exc)
    with pytest.raises(SlipstreamError):
        raise exc
