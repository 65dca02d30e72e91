"""The one parameter resolver of every model: a config.pbtxt ``parameters`` value, overridden by the
``MM_<NAME>`` environment variable, parsed and validated in one place (:mod:`mm_params.resolver`).

No dependencies (stdlib only): the transfer library, the engine, the Triton glue and the tooling all use it.
"""

from .resolver import ENV_PREFIX, ParamError, Params, env_name, parse_value, resolve_fields, tiny_model_dir

__all__ = ["ENV_PREFIX", "ParamError", "Params", "env_name", "parse_value", "resolve_fields", "tiny_model_dir"]
