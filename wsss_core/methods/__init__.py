"""The method registry: importing this package registers every shipped method (one module each)."""
from wsss_core.methods.base import (REGISTRY, Method, MethodParams, ModelParams, RawMap, RefineParams, get_method,
                                    method_params, register_method)
from wsss_core.methods import cam  # registers "cam"

__all__ = ["REGISTRY", "Method", "MethodParams", "ModelParams", "RawMap", "RefineParams", "cam", "get_method",
           "method_params", "register_method"]
