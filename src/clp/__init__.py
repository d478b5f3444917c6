"""clp-mtp: multi-token prediction on a frozen backbone, with the CLP length predictor."""

from clp.api import MODES, RUNTIMES, Model, load
from clp.backbones import BUNDLED, DEFAULT_MODEL, Backbone, load_backbone
from clp.decoding import Policy, Result, SamplingConfig, Stats, generate
from clp.errors import ClpError
from clp.runtime import Runtime, TransformersRuntime

__all__ = [
    "BUNDLED",
    "MODES",
    "RUNTIMES",
    "DEFAULT_MODEL",
    "Backbone",
    "ClpError",
    "Model",
    "Policy",
    "Result",
    "Runtime",
    "SamplingConfig",
    "Stats",
    "TransformersRuntime",
    "generate",
    "load",
    "load_backbone",
]
