"""Unpickling behind an allow-list: what a pickle may import is checked before it is imported.

A pickle runs code by naming a global (``os.system``, ``builtins.eval``, ``subprocess.Popen``) and
calling it. Every global a pickle names reaches the unpickler's ``find_class`` (the GLOBAL,
STACK_GLOBAL, INST, OBJ and EXT opcodes all go through it) before anything can call it, so a
``find_class`` that refuses every name off an allow-list stops the file before any of its code runs.
This holds for joblib files too: ``joblib.numpy_pickle.NumpyUnpickler`` is a ``pickle._Unpickler``
whose raw array bytes sit between pickle frames, and joblib routes object arrays' nested pickles
through the same ``find_class``. ``--trust-pickle`` opts in to unpickling; it does not switch this off.

The allow-list is strict by kind, not by package name: a scikit-learn *class*, a numpy ufunc, dtype or
scalar type, a scipy sparse matrix class, and a short list of named reconstructors. Functions are
refused unless named here (``numpy.load``, ``numpy.memmap`` and friends read or write files). A module
is imported to look a name up only when it belongs to scikit-learn, numpy or scipy, so a pickle cannot
even import an arbitrary module for its side effects.
"""

from __future__ import annotations

import _compat_pickle
import importlib
import importlib.util
import pickle
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from slipstream.errors import InvalidModelError, MissingDependencyError, UntrustedPickleError

# The scikit-learn wrappers of the boosting libraries and the boosters they hold (their __setstate__ hands the
# library's own model text or bytes to its loader), by exact name: nothing else of those packages is loaded.
BOOSTING_CLASSES: frozenset[tuple[str, str]] = frozenset(
    {("lightgbm.basic", "Booster"), ("lightgbm.sklearn", "LGBMClassifier"), ("lightgbm.sklearn", "LGBMRegressor")}
    | {("xgboost.core", "Booster"), ("xgboost.sklearn", "XGBClassifier"), ("xgboost.sklearn", "XGBRegressor")}
    | {("catboost.core", n) for n in ("CatBoost", "CatBoostClassifier", "CatBoostRegressor")}
)
_BUILTIN_TYPES: tuple[str, ...] = ("bool", "bytearray", "bytes", "complex", "dict", "float", "frozenset", "int")
_BUILTIN_TYPES += ("list", "object", "range", "set", "slice", "str", "tuple")
# Named reconstructors and plain types that pickles of scikit-learn models use, and nothing else.
_NAMED: frozenset[tuple[str, str]] = frozenset(
    {
        *(("builtins", n) for n in _BUILTIN_TYPES),
        ("_codecs", "encode"),  # protocol 2 writes bytes as _codecs.encode(text, "latin1")
        ("copyreg", "_reconstructor"),  # protocol 0/1 objects: cls.__new__ via a base, both checked here too
        *(("collections", n) for n in ("OrderedDict", "defaultdict", "deque", "Counter")),
        ("numpy", "dtype"),
        ("numpy", "ndarray"),
        *(
            (f"numpy.{core}.{module}", name)
            for core in ("core", "_core")
            for module, name in (("multiarray", "_reconstruct"), ("multiarray", "scalar"), ("numeric", "_frombuffer"))
        ),
        *(("numpy.random._pickle", n) for n in ("__bit_generator_ctor", "__generator_ctor", "__randomstate_ctor")),
        ("numpy.random.bit_generator", "__pyx_unpickle_SeedSequence"),
        ("joblib.numpy_pickle", "NumpyArrayWrapper"),  # joblib's placeholder for an array's raw bytes
        *BOOSTING_CLASSES,
    }
)
_LOOKUP_PACKAGES = frozenset({"sklearn", "numpy", "scipy"})
# Parts of scikit-learn that are not models: test helpers, dataset downloaders, vendored code.
_SKLEARN_DENIED_PARTS = frozenset({"tests", "_testing", "datasets", "externals", "_build_utils", "conftest"})


def _sklearn_ok(name: str, obj: Any) -> bool:
    if isinstance(obj, type):
        return str(obj.__module__).split(".")[0] == "sklearn"
    # Cython's generated pickle helpers: they rebuild an instance of a class that is checked separately.
    return callable(obj) and (name.startswith("__pyx_unpickle_") or name == "newObj")


def _numpy_ok(obj: Any) -> bool:
    import numpy as np

    if isinstance(obj, np.ufunc):
        return True  # pure element-wise math, e.g. FunctionTransformer(np.log1p)
    if not isinstance(obj, type):
        return False
    random_types = (np.random.BitGenerator, np.random.Generator, np.random.RandomState, np.random.SeedSequence)
    return issubclass(obj, np.generic | np.dtype) or issubclass(obj, random_types)


def _scipy_ok(obj: Any) -> bool:
    if not isinstance(obj, type):
        return False
    from scipy import sparse

    return issubclass(obj, sparse.spmatrix | sparse.sparray)


def refusal_reason(module: str, name: str, extra_allowed: frozenset[str]) -> str | None:
    """None when ``module.name`` may be loaded; otherwise why not (it is never imported in that case)."""
    if (module, name) in _NAMED or f"{module}.{name}" in extra_allowed:
        return None
    top = module.split(".")[0]
    if top not in _LOOKUP_PACKAGES:
        return f"{module}.{name} is outside the allow-list"
    if "." in name or not name.isidentifier():
        return f"{module}.{name} is a nested name, which the allow-list does not resolve"
    if top == "sklearn" and _SKLEARN_DENIED_PARTS.intersection(module.split(".")):
        return f"{module}.{name} is in a part of scikit-learn that holds no models"
    try:
        obj = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return f"{module}.{name} does not exist in the installed {top}"
    ok = {"sklearn": _sklearn_ok(name, obj), "numpy": _numpy_ok(obj), "scipy": _scipy_ok(obj)}[top]
    return None if ok else f"{module}.{name} is a {type(obj).__name__}, not one of the kinds {top} may provide"


class _RefusedError(Exception):
    """Raised inside the unpickler; turned into an UntrustedPickleError naming the file."""

    def __init__(self, qualified: str, reason: str) -> None:
        super().__init__(reason)
        self.qualified = qualified
        self.reason = reason


def _checked_find_class(unpickler: Any, module: str, name: str, extra_allowed: frozenset[str]) -> Any:
    # The pure-Python unpickler maps Python 2 names (``__builtin__``) inside find_class: check the mapped name.
    checked_module, checked_name = module, name
    if unpickler.proto < 3 and unpickler.fix_imports:
        if (module, name) in _compat_pickle.NAME_MAPPING:
            checked_module, checked_name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            checked_module = _compat_pickle.IMPORT_MAPPING[module]
    reason = refusal_reason(checked_module, checked_name, extra_allowed)
    if reason is not None:
        raise _RefusedError(f"{checked_module}.{checked_name}", reason)
    top = checked_module.partition(".")[0]
    if (checked_module, checked_name) in BOOSTING_CLASSES and importlib.util.find_spec(top) is None:
        raise MissingDependencyError(top, extra="boosting", feature=f"Loading a pickled {checked_name} model")
    return pickle._Unpickler.find_class(unpickler, module, name)


def load_sklearn_pickle(path: Path, *, extra_allowed: Iterable[str] = ()) -> Any:
    """Load a joblib or pickle file, refusing any global off the allow-list before it is imported.

    ``extra_allowed`` names further globals the caller vouches for, as ``module.name`` (e.g. a custom
    transformer class of their own package).
    """
    import joblib.numpy_pickle_utils as jutils
    from joblib.numpy_pickle import NumpyUnpickler

    allowed = frozenset(extra_allowed)

    class AllowListUnpickler(NumpyUnpickler):  # type: ignore[misc]
        def find_class(self, module: str, name: str) -> Any:
            return _checked_find_class(self, module, name, allowed)

    with path.open("rb") as raw:
        if jutils._detect_compressor(raw) == "compat":
            raise InvalidModelError(
                f"'{path}' was written by joblib before 0.10, a format that keeps arrays in side files.",
                source=str(path),
                hint="Load it once where it was made and re-save it with a current joblib.dump.",
            )
        with jutils._validate_fileobject_and_memmap(raw, str(path), None) as (stream, _):
            unpickler = AllowListUnpickler(str(path), stream, True, mmap_mode=None)
            try:
                return unpickler.load()
            except _RefusedError as refused:
                raise refusal_error(path, refused.qualified, refused.reason) from None


def refusal_error(path: Path, qualified: str, reason: str) -> UntrustedPickleError:
    """The refusal, naming the file and the import; the hint never invites vouching for a standard-library name."""
    resave = (
        "If the file is yours, re-save just the fitted estimator with joblib.dump(estimator, path), or convert "
        "the estimator in memory with slipstream.convert(estimator, out)."
    )
    if qualified.split(".")[0] in sys.stdlib_module_names:
        hint = f"Crafted pickles use {qualified} to run commands or reach files: do not load this file. {resave}"
    else:
        hint = (
            f"{resave} If {qualified} is a class of your own that you trust, convert with "
            "slipstream.importers.sklearn.import_sklearn(path, out, trust_pickle=True, "
            f"allow_pickle_globals=['{qualified}'])."
        )
    return UntrustedPickleError(
        f"'{path}' imports {qualified}, which slipstream does not load from a pickle ({reason}). The file was "
        "refused at that import, so nothing off the allow-list was imported or run. Trusting a pickle "
        "(--trust-pickle) allows scikit-learn classes, numpy arrays, dtypes and ufuncs, scipy sparse matrices, "
        "the LightGBM/XGBoost/CatBoost scikit-learn wrappers and boosters, and plain containers.",
        source=str(path),
        hint=hint,
    )


# -- static scanning: the globals a pickle stream names, without running it -------------------------------

_STRING_OPS = frozenset({"STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "BINUNICODE", "SHORT_BINUNICODE"})
_STRING_OPS |= {"BINUNICODE8"}
_PUT_OPS = frozenset({"PUT", "BINPUT", "LONG_BINPUT"})
_GET_OPS = frozenset({"GET", "BINGET", "LONG_BINGET"})
_NEUTRAL_OPS = frozenset({"PROTO", "FRAME"})
COMPUTED = "<a name computed at load time>"


def pickle_globals(data: bytes, start: int = 0) -> tuple[list[tuple[str, str]], int]:
    """Every (module, name) one pickle stream imports, and the offset just past its STOP.

    Found with ``pickletools.genops``, never by unpickling. GLOBAL and INST carry their names; for
    STACK_GLOBAL the two names must be the two values pushed last as plain strings (directly or through
    the memo): a name the stream computes any other way is reported as ``COMPUTED``, which no allow-list
    admits. Raises ``ValueError`` when the bytes are not a pickle.
    """
    import io
    import pickletools

    stream = io.BytesIO(data)
    stream.seek(start)
    found: list[tuple[str, str]] = []
    # What the top of the stack is known to be: a string, or None once anything else may have happened.
    pushed: list[str | None] = []
    memo: dict[int, str | None] = {}
    try:
        for opcode, arg, _ in pickletools.genops(stream):
            name = opcode.name
            if name in _STRING_OPS:
                pushed.append(arg if isinstance(arg, str) else None)
            elif name in _PUT_OPS or name == "MEMOIZE":
                memo[arg if isinstance(arg, int) else len(memo)] = pushed[-1] if pushed else None
            elif name in _GET_OPS:
                pushed.append(memo.get(arg) if isinstance(arg, int) else None)
            elif name in ("GLOBAL", "INST"):
                module, _, attr = str(arg).partition(" ")
                found.append((module, attr))
                pushed.append(None)
            elif name == "STACK_GLOBAL":
                module_name, attr_name = (pushed[-2], pushed[-1]) if len(pushed) >= 2 else (None, None)
                found.append((module_name, attr_name) if module_name and attr_name else (COMPUTED, ""))
                pushed.append(None)
            elif name in ("EXT1", "EXT2", "EXT4"):
                found.append((COMPUTED, f"extension code {arg}"))
                pushed.append(None)
            elif name not in _NEUTRAL_OPS:
                pushed.append(None)
            del pushed[:-2]
    except (ValueError, EOFError) as exc:  # genops raises ValueError (and EOF-ish) for bytes that are no pickle
        raise ValueError(f"not a pickle stream: {exc}") from exc
    return found, stream.tell()
