"""skl2onnx, called so that the models users bring convert, and refused by name when they cannot.

Three things the plain ``convert_sklearn`` call got wrong:

- **Opsets.** ``--opset N`` sets the ``ai.onnx`` opset only. Tree ensembles and IsolationForest emit
  ``ai.onnx.ml`` operators, and skl2onnx refuses to *declare* an ``ai.onnx.ml`` version above the one it
  was tested with (3 for ``ai.onnx`` 18 and later) unless the target says so, so IsolationForest failed
  and, through Python, ended in a raw ``KeyError``. The target is now always a pair, chosen from the
  ``ai.onnx`` opset: the ``ai.onnx.ml`` version released with it (onnx's version table), capped at what
  skl2onnx supports. Both are written to the manifest (``resolved.target_opsets``; the ones the model
  uses are in ``resolved.opsets``).
- **HistGradientBoosting.** skl2onnx 1.20's tree walk for it gives leaves ``missing_value_tracks_true =
  False`` (a Python bool) beside ``numpy.uint8`` values for branches; onnx 1.23's ``make_attribute``
  refuses a bool in an int list ("Expected an int, got a boolean"), and skl2onnx reports that as a
  truncated dump of every attribute. The HistGradientBoosting converters are wrapped for this call only
  (``custom_conversion_functions``, no global registration) so that bools in attribute lists go in as ints.
- **Refusals.** A step with no converter is refused by its class path, with what skl2onnx's registry
  holds; other failures keep their own cause instead of the blanket "every step needs a converter" hint.
"""

from __future__ import annotations

import difflib
import importlib
import re
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import onnx

from slipstream.errors import ConversionError, UnsupportedOpError
from slipstream.importers.sklearn_columns import Layout

_HGB_ALIASES = {
    "HistGradientBoostingClassifier": "SklearnHistGradientBoostingClassifier",
    "HistGradientBoostingRegressor": "SklearnHistGradientBoostingRegressor",
}
_TYPE_IN_MESSAGE = re.compile(r"<class '([\w.]+)'>")


def target_opsets(opset: int | None) -> dict[str, int]:
    """The ``ai.onnx`` opset (asked for, else the newest skl2onnx is tested with) and its ``ai.onnx.ml`` pair."""
    import skl2onnx
    from onnx.defs import onnx_opset_version
    from onnx.helper import VERSION_TABLE
    from skl2onnx.common._topology import get_default_opset_for_domain

    main = opset or min(int(skl2onnx.__max_supported_opset__), onnx_opset_version())
    released = [row[3] for row in VERSION_TABLE if row[2] <= main]  # rows: (release, ir, ai.onnx, ai.onnx.ml, ...)
    ml_cap = int(get_default_opset_for_domain("ai.onnx.ml"))
    return {"": main, "ai.onnx.ml": min(max(released, default=1), ml_cap)}


def qualified(cls: type) -> str:
    """The public path of a class (``sklearn.preprocessing.SplineTransformer``, not its private module's)."""
    parts = cls.__module__.split(".")
    for end in range(1, len(parts) + 1):
        if parts[end - 1].startswith("_"):
            break
        module = ".".join(parts[:end])
        try:
            if getattr(importlib.import_module(module), cls.__name__, None) is cls:
                return f"{module}.{cls.__name__}"
        except ImportError:
            break
    return f"{cls.__module__}.{cls.__qualname__}"


def _parts(estimator: Any, where: str) -> Iterator[tuple[str, Any]]:
    """Every estimator skl2onnx converts on its own: the model, and the steps of Pipelines, ColumnTransformers
    and FeatureUnions inside it (meta-estimators convert their children themselves)."""
    yield where, estimator
    children: list[tuple[str, Any]] = []
    if hasattr(estimator, "steps"):
        children = [(name, step) for name, step in estimator.steps]
    elif hasattr(estimator, "transformers_"):
        children = [(name, step) for name, step, _ in estimator.transformers_]
    elif hasattr(estimator, "transformer_list"):
        children = list(estimator.transformer_list)
    for name, child in children:
        if not isinstance(child, str) and child is not None:  # "drop" / "passthrough"
            yield from _parts(child, f"{where} → {name}")


def refuse_unsupported(estimator: Any, source: str | None) -> None:
    """Refuse, by class path, the first part that skl2onnx's registry has no converter for."""
    from skl2onnx._supported_operators import sklearn_operator_name_map

    for where, part in _parts(estimator, type(estimator).__name__):
        if type(part) not in sklearn_operator_name_map:
            raise unsupported_error(type(part), where, sorted(c.__name__ for c in sklearn_operator_name_map), source)


def unsupported_error(cls: type, where: str | None, registered: list[str], source: str | None) -> UnsupportedOpError:
    import skl2onnx

    near = difflib.get_close_matches(cls.__name__, registered, n=3, cutoff=0.5)
    nearest = f" The nearest it has: {', '.join(near)}." if near else ""
    place = f" (at {where})" if where and "→" in where else ""
    return UnsupportedOpError(
        f"skl2onnx {skl2onnx.__version__} has no converter for {qualified(cls)}{place}: its registry holds "
        f"converters for {len(registered)} estimator classes, and this is not one of them.{nearest}",
        op=qualified(cls),
        module=where,
        source=source,
        hint="Replace the step with one skl2onnx converts (skl2onnx.supported_converters() lists them), or "
        "register a converter for it with skl2onnx.update_registered_converter before converting.",
    )


def _ints_for_bools(add_node: Callable[..., Any]) -> Callable[..., Any]:
    def add(*args: Any, **attrs: Any) -> Any:
        fixed = {
            k: [int(x) for x in v] if isinstance(v, list) and any(isinstance(x, bool | np.bool_) for x in v) else v
            for k, v in attrs.items()
        }
        return add_node(*args, **fixed)

    return add


def _hgb_converters() -> dict[type, Callable[..., None]]:
    """The HistGradientBoosting converters, with bool attribute lists passed as ints (see the module doc)."""
    import sklearn.ensemble
    from skl2onnx.common._registration import get_converter

    def wrap(alias: str) -> Callable[..., None]:
        base = get_converter(alias)

        def convert(scope: Any, operator: Any, container: Any) -> None:
            original = container.add_node
            container.add_node = _ints_for_bools(original)  # this conversion's container only
            try:
                base(scope, operator, container)
            finally:
                container.add_node = original

        return convert

    return {getattr(sklearn.ensemble, name): wrap(alias) for name, alias in _HGB_ALIASES.items()}


def no_zipmap(estimator: Any) -> dict[int, dict[str, bool]]:
    """Plain label + probability tensors for every classifier in the model (ZipMap makes a list of dicts)."""
    from sklearn.base import is_classifier

    parts = [estimator]
    if hasattr(estimator, "get_params"):
        parts += [v for v in estimator.get_params(deep=True).values() if hasattr(v, "predict_proba")]
    # A Pipeline is a classifier when its last step is; the option belongs to that step, not the Pipeline.
    return {id(p): {"zipmap": False} for p in parts if is_classifier(p) and not hasattr(p, "steps")}


def to_onnx(estimator: Any, layout: Layout, opsets: dict[str, int], source: str | None) -> onnx.ModelProto:
    """Convert with skl2onnx; every failure names its cause."""
    refuse_unsupported(estimator, source)
    proto = _convert_sklearn(estimator, layout, opsets, source)
    if not isinstance(proto, onnx.ModelProto):
        raise ConversionError("The converter returned no ONNX model.", source=source)
    _dedupe_opsets(proto)
    return proto


def _convert_sklearn(estimator: Any, layout: Layout, opsets: dict[str, int], source: str | None) -> onnx.ModelProto:
    from skl2onnx import convert_sklearn
    from skl2onnx._supported_operators import sklearn_operator_name_map

    try:
        with warnings.catch_warnings():
            # skl2onnx reads SVC's probA_/probB_, which scikit-learn 1.9 deprecates: not the user's concern.
            warnings.filterwarnings("ignore", message=r"Attribute `prob[AB]_` was deprecated", category=FutureWarning)
            proto: onnx.ModelProto = convert_sklearn(
                estimator,
                initial_types=layout.initial_types(),
                options=no_zipmap(estimator),
                target_opset=opsets,
                custom_conversion_functions=_hgb_converters(),
            )
    except Exception as exc:  # skl2onnx raises RuntimeError, NotImplementedError, MissingShapeCalculator...
        text = str(exc).strip()
        named = _TYPE_IN_MESSAGE.search(text)
        missing = type(exc).__name__ in ("MissingShapeCalculator", "MissingConverter") or "find alias" in text
        if missing and named is not None:  # a child of a meta-estimator: skl2onnx names its class
            module, _, name = named.group(1).rpartition(".")
            cls = getattr(importlib.import_module(module), name, None)
            if isinstance(cls, type):
                registered = sorted(c.__name__ for c in sklearn_operator_name_map)
                raise unsupported_error(cls, None, registered, source) from exc
        first = text.splitlines()[0][:300] if text else ""
        cause = exc.__cause__
        detail = f" (caused by {type(cause).__name__}: {str(cause)[:200]})" if cause is not None else ""
        raise ConversionError(
            f"skl2onnx cannot convert the {type(estimator).__name__}: {type(exc).__name__}: {first}{detail}",
            source=source,
            hint=f"Targets were ai.onnx {opsets['']} and ai.onnx.ml {opsets['ai.onnx.ml']}; if the message names "
            "an opset, pass --opset with a newer one. Otherwise this is a skl2onnx limitation for this estimator's "
            "settings: try the estimator's defaults.",
        ) from exc
    return proto


def _dedupe_opsets(proto: onnx.ModelProto) -> None:
    """skl2onnx can list the same domain twice in opset_import; keep the highest version once."""
    best: dict[str, int] = {}
    for imp in proto.opset_import:
        best[imp.domain] = max(best.get(imp.domain, 0), imp.version)
    if len(best) != len(proto.opset_import):
        del proto.opset_import[:]
        for domain, ver in best.items():
            proto.opset_import.add(domain=domain, version=ver)
