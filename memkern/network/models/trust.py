"""Which model specs a file may name: a received run's config is data, not code to run.

A spec typed by the user (``--model``, or a notebook's ``build_model``) is the user's choice. A
spec read from a file (config.json, a checkpoint's metadata) is honoured only when it names one
of memkern's models (``hf:gpt2?...`` among them: its keywords are config values of fixed
kinds), a ``torchvision:``/``timm:`` model by its plain name, or a factory this user allowed:
``--trust-model-code`` on the command, or ``MEMKERN_TRUSTED_FACTORIES`` (comma-separated
``package.module:factory``, or ``package.module:*`` for every factory of a module).
The check reads strings only; nothing is imported before it passes. See README, "Safety".
"""
from __future__ import annotations

import os
import re

from memkern.errors import ConfigError
from memkern.network.models.hf_gpt2 import hf_gpt2_settings, is_hf_spec
from memkern.network.models.zoo import ZOO_SOURCES, is_spec, parse_spec

TRUST_ENV = "MEMKERN_TRUSTED_FACTORIES"
# A zoo model's registered name: timm's "hf-hub:" / "local-dir:" forms would fetch or read
# files named by the spec, so a file may name only plain registry names.
_ZOO_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.]*$")
# Constructor keywords that make a zoo model read or fetch something (weights, configs).
_ZOO_FETCHING = re.compile(r"pretrained|weights|checkpoint|path|file|dir|url|cache|hub",
                           re.IGNORECASE)

_allow_all = False  # set for one command by --trust-model-code


def allow_model_code(allow: bool) -> None:
    """Honour every factory spec read from a file (``--trust-model-code``) until reset."""
    global _allow_all
    _allow_all = allow


def _allowed_factories() -> set[str]:
    return {t.strip() for t in os.environ.get(TRUST_ENV, "").split(",") if t.strip()}


def check_file_spec(model: str, *, source: str) -> None:
    """ConfigError unless the model ``model``, read from ``source`` (a file), may be built."""
    if not is_spec(model):
        return  # a name: memkern's own models only (an unknown one is refused when built)
    if is_hf_spec(model):
        hf_gpt2_settings(model)  # fixed config fields of fixed kinds: data, no code named
        return
    spec = parse_spec(model)
    if spec.source in ZOO_SOURCES:
        if not _ZOO_NAME.match(spec.name):
            raise ConfigError(f"{source}: model {model!r} is not a plain {spec.source} model "
                              f"name; a run's files may name registered models only")
        fetching = sorted(k for k in spec.kwargs if _ZOO_FETCHING.search(k))
        if fetching:
            raise ConfigError(f"{source}: model {model!r} sets {fetching[0]!r}, which reads or "
                              f"fetches files; a run's files may not: pass the model on the "
                              f"command line instead")
        return
    factory = f"{spec.source}:{spec.name}"
    allowed = _allowed_factories()
    if _allow_all or factory in allowed or f"{spec.source}:*" in allowed:
        return
    raise ConfigError(f"{source} names the model code {factory} (spec {model!r}), which memkern "
                      f"imports and runs only when you allow it: if you trust this run, pass "
                      f"--trust-model-code or set {TRUST_ENV}={factory}")
