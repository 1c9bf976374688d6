"""Connecting to Ray: an existing cluster (--address) or a local one started for this command.

Every command joins Ray here, so a wrong address fails the same way for all of them: within
CONNECT_TIMEOUT_S, with one line that names the address and what to check. ray.init alone can
wait more than ten minutes on an address where nothing answers; a TCP probe first catches the
usual cases (refused, unknown host, unreachable) in at most PROBE_TIMEOUT_S, and a deadline on
ray.init catches the rest (a port that answers but is not a Ray head).
"""
from __future__ import annotations

import os
import re
import socket
import sys
import threading

from promptad.errors import UserError

PROBE_TIMEOUT_S = 3.0
# All of ray.init against an existing cluster; it normally takes 1-5 s. Override with
# PROMPTAD_CONNECT_TIMEOUT_S for a cluster behind a slow link.
CONNECT_TIMEOUT_S = 20.0


def _connect_timeout() -> float:
    try:
        return float(os.environ.get("PROMPTAD_CONNECT_TIMEOUT_S", CONNECT_TIMEOUT_S))
    except ValueError:
        return CONNECT_TIMEOUT_S


def _unreachable(address: str, source: str, reason: str) -> str:
    leave = "leave --address out" if source == "--address" else "unset RAY_ADDRESS"
    return (f"no Ray cluster answers at {source} {address} ({reason}); check that the cluster is up "
            f"(`ray status` on its head node), that the address is its head's HOST:PORT (GCS port, default "
            f"6379) or ray://HOST:10001 for Ray Client, not the dashboard's http:// address, and that this "
            f"machine can reach it; or {leave} to start a local Ray")


def _shorten(text: str, limit: int = 300) -> str:
    """`text` on one line, cut at a word boundary (with "...") when longer than `limit`: Ray's
    hints were cut mid-word."""
    text = " ".join(text.split())
    if len(text) <= limit:
        return text
    cut = text[:limit].rsplit(" ", 1)[0].rstrip(",;:")
    return cut + " ..."


def check_address(address: str | None) -> None:
    """What can be told of --address (or RAY_ADDRESS) without Ray, in seconds: a dashboard URL
    (http://HOST:8265, what `ray job submit` takes) is not a cluster address, and a HOST:PORT must
    accept a TCP connection. Commands call this before printing their plans, so a wrong address
    is the only line."""
    source = "--address" if address else "RAY_ADDRESS"
    address = address or os.environ.get("RAY_ADDRESS") or None
    if not address or address in ("local", "auto"):
        return
    if re.match(r"^https?://", address, re.I):
        leave = "leave --address out" if source == "--address" else "unset RAY_ADDRESS"
        raise UserError(f"{source} {address} is a dashboard (Jobs API) address, which `ray job submit --address` "
                        f"takes; a command joins a cluster at its head's HOST:6379 (GCS) or ray://HOST:10001 (Ray "
                        f"Client), or {leave} to start a local Ray")
    _probe(address, source)


def _host_port(address: str) -> tuple[str, int] | None:
    """(host, port) of 'host:port', '[v6]:port' or 'ray://host:port'; None for 'auto' and the like."""
    bare = address[len("ray://"):] if address.startswith("ray://") else address
    m = re.fullmatch(r"\[([^\]]+)\]:(\d+)|([^:/\[\]]+):(\d+)", bare.strip().rstrip("/"))
    if not m:
        return None
    host, port = (m.group(1), m.group(2)) if m.group(1) else (m.group(3), m.group(4))
    return host, int(port)


def _probe(address: str, source: str) -> None:
    """One TCP connection to the head, so a dead or mistyped address fails in seconds."""
    target = _host_port(address)
    if target is None:
        return
    try:
        with socket.create_connection(target, timeout=PROBE_TIMEOUT_S):
            pass
    except socket.gaierror as e:
        raise UserError(_unreachable(address, source, f"unknown host {target[0]!r}: {e.strerror}")) from None
    except OSError as e:
        reason = "no answer within {:g} s".format(PROBE_TIMEOUT_S) if isinstance(e, TimeoutError) \
            else (e.strerror or type(e).__name__).lower()
        raise UserError(_unreachable(address, source, reason)) from None


class _Deadline:
    """ray.init cannot be interrupted from Python while it waits inside Ray's C++ client, so past
    the deadline this prints the one-line error and ends the process (exit code 2, as UserError)."""

    def __init__(self, address: str, source: str, seconds: float):
        self.message = _unreachable(address, source, f"ray.init did not connect within {seconds:g} s")
        self.timer = threading.Timer(seconds, self._give_up)
        self.timer.daemon = True

    def _give_up(self) -> None:
        print(f"promptad: error: {self.message}", file=sys.stderr, flush=True)
        os._exit(2)

    def __enter__(self) -> _Deadline:
        self.timer.start()
        return self

    def __exit__(self, *exc) -> None:
        self.timer.cancel()


def _import_torch_first() -> None:
    """torch is loaded before ray.init, never after: in the first job a fresh cluster runs (`ray job
    submit` with a working_dir), `ray.init(); import torch` dies in torch's MKL initialization
    ("Intel oneMKL FATAL ERROR: Cannot load .../libtorch_cpu.so", torch 2.14.1, Ray 2.60; seen in
    tests/test_two_node.py), while `import torch; ray.init()` works. Every command needs torch
    right after connecting anyway; score's planning no longer imports it, so this keeps the order."""
    import torch  # noqa: F401


def connect(address: str | None = None) -> None:
    """Join `address` (e.g. 'auto', 'HOST:6379', 'ray://HOST:10001') or start a local Ray; reuse
    one already up. Inside `ray job submit` RAY_ADDRESS is set, so `--address` can be left out there.

    Ray's console output goes where console.py says (a log file unless --verbose)."""
    import ray

    from promptad import console

    session = console.current()
    if ray.is_initialized():
        console.start_relay()
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    source = "--address" if address else "RAY_ADDRESS"
    address = address or os.environ.get("RAY_ADDRESS") or None
    kwargs = session.ray_init_kwargs() if session else {"log_to_driver": True}
    if session:
        session.prepare_for_ray()
    if address and address != "local":
        check_address(address if source == "--address" else None)
        _import_torch_first()
        with _Deadline(address, source, _connect_timeout()):
            try:
                context = ray.init(address=address, **kwargs)
            except (ConnectionError, ValueError, RuntimeError, TimeoutError) as e:
                reason = _shorten(str(e)) or type(e).__name__
                raise UserError(_unreachable(address, source, reason)) from None
    else:
        _import_torch_first()
        # "local" always starts a new Ray: a bare ray.init() would join whatever cluster another
        # process on this machine started last (/tmp/ray/ray_current_cluster).
        context = ray.init(address="local", include_dashboard=False, **kwargs)
    if session:
        import ray.data  # noqa: F401 - Ray Data adds its console handler on import: move it too

        session.ray_started(context)
    console.start_relay()


def is_local(address: str | None) -> bool:
    """True when this command starts its own Ray (no autoscaler can add nodes to it)."""
    address = address or os.environ.get("RAY_ADDRESS")
    return not address or address == "local"


def threads_for(cpus: float) -> int:
    """Torch threads for a task or actor that reserves `cpus` CPUs: the whole CPUs, at least one
    (a fractional reservation still runs on one core)."""
    return max(1, int(cpus))


def node_resources() -> list[dict[str, float]]:
    """The resources (CPU, GPU, ...) of each alive node of the connected Ray."""
    import ray

    return [{k: float(v) for k, v in n.get("Resources", {}).items()} for n in ray.nodes() if n.get("Alive")]


def check_fits(needs: dict[str, tuple[float, str]], what: str, fix: str, local: bool,
               per_node: bool = False) -> None:
    """A resource request the cluster can never grant would wait forever; say so instead.

    `needs` maps a resource (CPU, GPU) to (amount, how the flags asked for it); `per_node`: one
    task asks for all of it, so one node must hold all of it, not the cluster's sum. On a Ray this
    command started itself that is a UserError; on an existing cluster only a warning, since its
    autoscaler may still add the nodes.
    """
    import ray

    def fits(have: dict[str, float]) -> bool:
        return all(amount <= have.get(name, 0.0) + 1e-9 for name, (amount, _) in needs.items())

    if per_node:
        nodes = node_resources()
        if any(fits(n) for n in nodes):
            return
        have = {name: max((n.get(name, 0.0) for n in nodes), default=0.0) for name in needs}
        where = "the largest node of this Ray has"
    else:
        have, where = ray.cluster_resources(), "this machine's Ray has"
        if fits(have):
            return
    missing = [f"{asked} needs {amount:g} {name}s but {where} {have.get(name, 0.0):g}"
               for name, (amount, asked) in needs.items() if amount > have.get(name, 0.0) + 1e-9]
    # Each resource fits some node, but no node holds them all.
    missing = missing or ["no single node has " + " and ".join(
        f"{amount:g} {name}s ({asked})" for name, (amount, asked) in needs.items())]
    msg = f"this Ray cluster cannot run {what}: {'; '.join(missing)}"
    if local:
        raise UserError(f"{msg}; {fix}")
    print(f"warning: {msg}; waiting for the autoscaler", file=sys.stderr)
