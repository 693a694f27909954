"""What every zoo entry is: a builder, how to convert what it built, one request and the framework's own answer."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

Arrays = dict[str, np.ndarray]
# The framework's own outputs on a request, in the order of ``Built.outputs`` (or the bundle's order if unset).
Expected = Callable[[Mapping[str, np.ndarray]], list[np.ndarray]]

# What quantize.dynamic must do with an entry. It quantizes MatMul/Gemm models without a word; it quantizes
# convolutions too but warns that ConvInteger is slow on CPUs; and it leaves tree ensembles as they are, saying
# that nothing was quantized. The test asserts the warning's text, so a changed reason turns it red.
QUANTIZES = ""
CONV_IS_SLOW = "ConvInteger, which on this CPU runs about 7× SLOWER than fp32"
NOTHING_TO_QUANTIZE = "nothing was quantized: the graph has no operator dynamic int8 applies to."


@dataclass(frozen=True)
class Built:
    """A built model: what to hand ``slipstream.convert`` and how to check one request against the framework."""

    source: Any  # the in-memory model, or a file or directory path
    convert_kwargs: dict[str, Any]
    request: Arrays  # one request's inputs, named like the bundle's inputs
    expected: Expected  # the framework's own outputs on those inputs
    outputs: tuple[str, ...] | None = None  # the output names ``expected`` answers in order; None: bundle order
    atol: float = 1e-4  # |served - framework| allowed per float element; strings and labels compare exactly
    quantized_io: bool = False  # integer outputs are quantized reals: they too may differ by ``atol`` steps


@dataclass(frozen=True)
class Entry:
    """One zoo model: its name (also the served name), its framework, a few words for the table, its builder."""

    name: str
    framework: str
    kind: str
    build: Callable[[Path], Built]
    quantize: str = QUANTIZES  # QUANTIZES, or the text of the warning quantize.dynamic must give


def rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)
