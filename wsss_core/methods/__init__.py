"""The method registry: importing this package registers every shipped method (one module each)."""
from wsss_core.methods.base import (REGISTRY, ExportParams, Method, MethodParams, ModelParams, RawMap, RefineParams,
                                    get_method, method_params, register_method)
from wsss_core.methods import cam, mct, multisa, semod  # registers "cam", "mct", "multisa" and "semod"

__all__ = ["REGISTRY", "ExportParams", "Method", "MethodParams", "ModelParams", "RawMap", "RefineParams", "cam", "mct",
           "multisa", "semod", "get_method", "method_params", "register_method"]
