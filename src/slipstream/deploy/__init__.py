"""``slipstream export``: hand a verified bundle (or a served repository) to the engine a user already runs.

Each target is a :class:`~slipstream.deploy.base.Deployer` in :data:`DEPLOYERS`, listed here by hand (no
import side effects register anything); :func:`~slipstream.deploy.base.export` owns verification, refusals
and the atomic write.
"""

from __future__ import annotations

from slipstream.deploy.base import (
    Deployer,
    DeployOptions,
    DeploySource,
    ExportResult,
    SourceBundle,
    export,
)
from slipstream.deploy.container import ContainerDeployer
from slipstream.deploy.edge import EdgeDeployer
from slipstream.deploy.kserve import KServeDeployer
from slipstream.deploy.ray import RayDeployer
from slipstream.deploy.triton import TritonDeployer

DEPLOYERS: dict[str, Deployer] = {
    "container": ContainerDeployer(),
    "edge": EdgeDeployer(),
    "kserve": KServeDeployer(),
    "ray": RayDeployer(),
    "triton": TritonDeployer(),
}

__all__ = [
    "DEPLOYERS",
    "DeployOptions",
    "DeploySource",
    "Deployer",
    "ExportResult",
    "SourceBundle",
    "export",
]
