"""Every error slipstream raises, rooted in one tree.

::

    SlipstreamError                      base; ``hint`` says what to do
    ├── ConfigError                 400  a setting, option or recipe field is invalid
    ├── MissingDependencyError           an optional extra is not installed (names the extra)
    ├── BundleError                      something is wrong with a bundle on disk (``path``)
    │   ├── BundleNotFoundError     404  no bundle where one was expected
    │   ├── BundleExistsError            the output path is taken and overwriting was not asked for
    │   ├── SchemaError                  manifest.json is unreadable, invalid or from a newer slipstream
    │   ├── IntegrityError               a file's sha256 or size differs from the manifest (``file``)
    │   └── SignatureError               a bundle is unsigned, modified since signing, or not signed by a trusted
    │                                    key (``reason``, ``file``)
    ├── ConversionError                  a source model could not become a bundle (``source``)
    │   ├── InvalidModelError       400  the model file is not a valid model of its kind
    │   ├── UntrustedPickleError         loading the source would run pickled code, and that was not allowed
    │   ├── UnsupportedOpError           the exporter has no ONNX conversion for an op (``op``, ``module``)
    │   └── ParityError                  the converted model's outputs differ from the source's (``mismatches``)
    ├── InputError                  400  a caller's tensors do not match the model (``input_name``)
    │   └── OutOfDistributionError  400  the monitor's screen refused the input (``reason``)
    ├── DataError                   400  a dataset file or callable does not fit the model (``source``)
    ├── PassError                        an optimization pass failed on a model (``pass_name``)
    ├── ExportRefusedError               an export target cannot express the bundle (``target``, ``reasons``)
    ├── EngineError                      onnxruntime could not build or run a session
    │   └── ProviderUnavailableError     a requested execution provider is missing (``provider``)
    └── ServingError                     the server refused a request (``retry_after_s`` when it may retry)
        ├── ProtocolError           400  a request does not follow the Open Inference Protocol v2
        ├── UnauthorizedError       401  no API key, or one the server does not know
        ├── ForbiddenError          403  the endpoint needs an admin key, or none is configured
        ├── ModelNotFoundError      404  no such model or version in the repository
        ├── MethodNotAllowedError   405  the endpoint exists but answers another HTTP method
        ├── PayloadTooLargeError    413  the request body is over the configured limit
        ├── RateLimitedError        429  the caller's token bucket is empty
        ├── ServerBusyError         503  a full queue, a model not ready, or a server draining
        └── RequestTimeoutError     504  the request waited longer than its timeout

Client-facing errors carry ``status_code``; the HTTP layer reads the attribute instead of branching on
types. Every message says what was expected, what came, and what to do (the ``hint``).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pydantic import ValidationError

__all__ = [
    "BundleError",
    "BundleExistsError",
    "BundleNotFoundError",
    "ConfigError",
    "ConversionError",
    "DataError",
    "EngineError",
    "ExportRefusedError",
    "ForbiddenError",
    "InputError",
    "IntegrityError",
    "InvalidModelError",
    "MethodNotAllowedError",
    "MissingDependencyError",
    "ModelNotFoundError",
    "OutOfDistributionError",
    "ParityError",
    "PassError",
    "PayloadTooLargeError",
    "ProtocolError",
    "ProviderUnavailableError",
    "RateLimitedError",
    "RequestTimeoutError",
    "SchemaError",
    "ServerBusyError",
    "ServingError",
    "SignatureError",
    "SlipstreamError",
    "UnauthorizedError",
    "UnsupportedOpError",
    "UntrustedPickleError",
    "first_few",
    "invalid_setting",
    "validation_problems",
]


class SlipstreamError(Exception):
    """The root of every error slipstream raises.

    ``message`` says what was expected and what came; ``hint`` says what to do about it.
    ``status_code`` is ``None`` for errors that are not a client's fault (they map to 500).
    """

    status_code: int | None = None

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        if self.hint:
            return f"{self.message}\n  hint: {self.hint}"
        return self.message


class ConfigError(SlipstreamError):
    """A setting, CLI option or recipe field is invalid; ``field`` names it when known."""

    status_code = 400

    def __init__(self, message: str, *, field: str | None = None, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.field = field


class MissingDependencyError(SlipstreamError):
    """An optional extra that this feature needs is not installed."""

    def __init__(self, package: str, *, extra: str, feature: str) -> None:
        super().__init__(
            f"{feature} needs the Python package '{package}', which is not installed.",
            hint=f"pip install 'slipstream[{extra}]'",
        )
        self.package = package
        self.extra = extra


class BundleError(SlipstreamError):
    """Something is wrong with a bundle directory."""

    def __init__(self, message: str, *, path: Path | str, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.path = Path(path)


class BundleNotFoundError(BundleError):
    status_code = 404


class BundleExistsError(BundleError):
    pass


class SchemaError(BundleError):
    pass


class IntegrityError(BundleError):
    """A file in a bundle does not match the digest recorded in its manifest."""

    def __init__(self, message: str, *, path: Path | str, file: str, hint: str | None = None) -> None:
        super().__init__(message, path=path, hint=hint)
        self.file = file


class SignatureError(BundleError):
    """A bundle's OpenSSF model signature is missing, does not match its files, or was not made by a trusted key.

    ``reason`` is one of 'unsigned', 'modified', 'untrusted' or 'unreadable'; ``file`` names the bundle file that
    failed (the signature file itself for 'unsigned', 'untrusted' and 'unreadable').
    """

    def __init__(self, message: str, *, path: Path | str, reason: str, file: str, hint: str | None = None) -> None:
        super().__init__(message, path=path, hint=hint)
        self.reason = reason
        self.file = file


class ConversionError(SlipstreamError):
    def __init__(self, message: str, *, source: str | None = None, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.source = source


class InvalidModelError(ConversionError):
    status_code = 400


class UntrustedPickleError(ConversionError):
    """The source is a pickle (it runs code when loaded) and ``trust_pickle`` was not given."""


class UnsupportedOpError(ConversionError):
    """The exporter cannot convert ``op``; ``module`` names the submodule that calls it, when known."""

    def __init__(
        self, message: str, *, op: str, module: str | None = None, source: str | None = None, hint: str | None = None
    ) -> None:
        super().__init__(message, source=source, hint=hint)
        self.op = op
        self.module = module


class ParityError(ConversionError):
    """The ONNX model does not reproduce the source; ``mismatches`` lists every failed comparison."""

    def __init__(self, mismatches: list[str], *, source: str | None = None, hint: str | None = None) -> None:
        listing = "\n".join(f"  - {m}" for m in mismatches)
        super().__init__(
            f"The converted model does not match the source on {len(mismatches)} comparison(s):\n{listing}",
            source=source,
            hint=hint,
        )
        self.mismatches = mismatches


class InputError(SlipstreamError):
    """A caller's tensors do not match what the model takes."""

    status_code = 400

    def __init__(self, message: str, *, input_name: str | None = None, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.input_name = input_name


class OutOfDistributionError(InputError):
    """The monitor's out-of-distribution screen refused the input; the screen already counted it."""

    reason = "out_of_distribution"


class PassError(SlipstreamError):
    """An optimization pass could not produce its output; ``pass_name`` names it."""

    def __init__(self, message: str, *, pass_name: str, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.pass_name = pass_name


class DataError(SlipstreamError):
    """Evaluation, calibration or training data does not fit the model."""

    status_code = 400

    def __init__(self, message: str, *, source: str | None = None, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.source = source


class ExportRefusedError(SlipstreamError):
    """``slipstream export`` refused before writing anything: ``reasons`` lists every problem, ``target`` the target."""

    def __init__(self, message: str, *, target: str, reasons: list[str], hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.target = target
        self.reasons = reasons


class EngineError(SlipstreamError):
    pass


class ProviderUnavailableError(EngineError):
    def __init__(self, message: str, *, provider: str, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.provider = provider


class ServingError(SlipstreamError):
    """The server refused a request; ``retry_after_s`` (when set) becomes a ``Retry-After`` header."""

    status_code: int | None = 500

    def __init__(self, message: str, *, hint: str | None = None, retry_after_s: float | None = None) -> None:
        super().__init__(message, hint=hint)
        self.retry_after_s = retry_after_s


class ProtocolError(ServingError):
    status_code = 400


class UnauthorizedError(ServingError):
    status_code = 401


class ForbiddenError(ServingError):
    status_code = 403


class ModelNotFoundError(ServingError):
    status_code = 404


class MethodNotAllowedError(ServingError):
    status_code = 405


class PayloadTooLargeError(ServingError):
    status_code = 413


class RateLimitedError(ServingError):
    status_code = 429


class ServerBusyError(ServingError):
    status_code = 503


class RequestTimeoutError(ServingError):
    status_code = 504


def first_few(items: list[str], sep: str = ", ", limit: int = 5) -> str:
    """Up to ``limit`` items joined, then how many more there were (for a message listing problems)."""
    return sep.join(items[:limit]) + (f" and {len(items) - limit} more" if len(items) > limit else "")


def validation_problems(exc: ValidationError) -> str:
    """Every problem of a pydantic ValidationError as ``field.path: message; ...`` for one error message."""
    return "; ".join(f"{'.'.join(str(p) for p in e['loc']) or '<root>'}: {e['msg']}" for e in exc.errors())


def invalid_setting(exc: ValidationError, what: str, *, hint: str | None = None) -> ConfigError:
    """A ConfigError for the first problem of a settings object: names the field and the value that came."""
    first = exc.errors()[0]
    field = ".".join(str(p) for p in first["loc"])
    return ConfigError(
        f"Invalid {what} setting {field}: {first['msg']} (got {first.get('input')!r}).", field=field, hint=hint
    )
