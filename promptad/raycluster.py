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


def is_local(address: str | None) -> bool:
    """True when this command starts its own Ray (no autoscaler can add nodes to it)."""
    address = address or os.environ.get("RAY_ADDRESS")
    return not address or address == "local"


def check_fits(needs: dict[str, tuple[float, str]], what: str, fix: str, local: bool) -> None:
    """A resource request the cluster can never grant would wait forever; say so instead.

    `needs` maps a resource (CPU, GPU) to (amount, how the flags asked for it). On a Ray this
    command started itself that is a UserError; on an existing cluster only a warning, since its
    autoscaler may still add the nodes.
    """
    import sys

    import ray

    have = ray.cluster_resources()
    missing = [f"{asked} needs {amount:g} {name}s but this machine's Ray has {have.get(name, 0.0):g}"
               for name, (amount, asked) in needs.items() if amount > have.get(name, 0.0) + 1e-9]
    if not missing:
        return
    msg = f"this Ray cluster cannot run {what}: {'; '.join(missing)}"
    if local:
        from .errors import UserError

        raise UserError(f"{msg}; {fix}")
    print(f"warning: {msg}; waiting for the autoscaler", file=sys.stderr)
