"""Connecting to Ray: an existing cluster (--address) or a local one started for this command."""
from __future__ import annotations

import os


def connect(address: str | None = None) -> None:
    """Join `address` (e.g. 'auto', 'ray://head:10001') or start a local Ray; reuse one already up.

    Inside `ray job submit` RAY_ADDRESS is set, so `--address` can be left out there.
    """
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        # "local" always starts a new Ray: a bare ray.init() would join whatever cluster another
        # process on this machine started last (/tmp/ray/ray_current_cluster).
        ray.init(address="local", include_dashboard=False, log_to_driver=True)
