"""Is the Hugging Face hub worth asking? Without network, hub clients retry for ~25-30 s per call."""

from __future__ import annotations

import os
import socket
from urllib.parse import urlparse


def hub_reachable(timeout: float = 3.0) -> bool:
    """Cheap check before `load_dataset`, which retries for ~25 s when there is no network.

    In offline mode (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE) or behind a proxy we cannot tell cheaply, so we
    say yes and let `load_dataset` answer (from its cache, quickly, in offline mode)."""
    env = {k: os.environ.get(k, "").lower() for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    if any(v in ("1", "true", "yes", "on") for v in env.values()):
        return True
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "huggingface.co", port), timeout=timeout):
            return True
    except OSError:
        return False
