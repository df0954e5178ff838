"""Secrets come only from environment variables: the config names the variable (model.token_env), never the value.

The value is handed to huggingface_hub through HF_TOKEN in this process's environment, so it never enters the
config object, the resolved config.yaml, logs or any other file of the run folder.
"""

from __future__ import annotations

import os

from dpokit.core.errors import UserError


def apply_token_env(model_cfg) -> None:
    """Make the token named by `model.token_env` the hub token of this process (no-op when unset)."""
    name = getattr(model_cfg, "token_env", None)
    if not name:
        return
    value = os.environ.get(name)
    if not value:
        raise UserError(f"model.token_env: environment variable {name} is not set or empty; export {name}=<your "
                        "token> before running, or remove model.token_env")
    if name != "HF_TOKEN":
        os.environ["HF_TOKEN"] = value
