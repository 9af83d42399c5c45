"""Is the Hugging Face hub usable from here? One cheap, cached answer shared by model and data loading.

Asking transformers or datasets directly costs half a minute of retries on a machine without network,
so we probe once with a short TCP connect and honour the standard offline variables.
"""

from __future__ import annotations

import functools
import os
import socket

HUB_HOST, HUB_PORT, HUB_PROBE_TIMEOUT_S = "huggingface.co", 443, 2.0
OFFLINE_ENVS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")


def env_flag(name: str) -> bool:
    """Whether environment variable ``name`` is set to a true value (1, true, yes, on)."""
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def offline_requested() -> bool:
    """Whether the user set any of the standard HF offline variables."""
    return any(env_flag(name) for name in OFFLINE_ENVS)


@functools.cache
def hub_reachable() -> bool:
    """Whether huggingface.co:443 accepts a TCP connection within HUB_PROBE_TIMEOUT_S (probed once)."""
    if offline_requested():
        return False
    try:
        socket.create_connection((HUB_HOST, HUB_PORT), timeout=HUB_PROBE_TIMEOUT_S).close()
        return True
    except OSError:
        return False
