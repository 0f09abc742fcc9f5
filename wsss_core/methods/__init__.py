"""The method registry: importing this package registers every shipped method (one module each)."""
from wsss_core.methods.base import (REGISTRY, Method, MethodParams, ModelParams, RawMap, RefineParams, get_method,
                                    method_params, register_method)
from wsss_core.methods import cam, multisa  # registers "cam" and "multisa"

__all__ = ["REGISTRY", "Method", "MethodParams", "ModelParams", "RawMap", "RefineParams", "cam", "multisa", "get_method",
           "method_params", "register_method"]
