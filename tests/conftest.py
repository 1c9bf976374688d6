"""Shared fixtures. Environment first: no model hub, no Ray token auth, quiet Ray."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DATASETS = REPO.parent / "shared" / "datasets"


@pytest.fixture(scope="session")
def datasets_root() -> Path:
    """Real MVTec-layout data shipped beside the checkout (read in place, never copied)."""
    if not (DATASETS / "magnetic_tile").is_dir():
        pytest.skip("../shared/datasets is not present")
    return DATASETS


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server on 127.0.0.1 for the whole session; yields its endpoint URL.

    Sets the standard AWS variables in os.environ (fake keys, us-east-1, AWS_ENDPOINT_URL and
    AWS_ENDPOINT_URL_S3 pointing at moto, EC2 metadata lookups off) so that pyarrow, boto3 and
    s3fs all reach moto with no extra arguments. Ray workers inherit the driver's environment
    when Ray starts, so a fixture that starts Ray and must reach S3 has to depend on this one
    (Ray started before it would not see the endpoint). The environment is restored at the end.
    """
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    _MOTO["server"] = server
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    with pytest.MonkeyPatch.context() as mp:
        for name in ("AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_PROFILE"):
            mp.delenv(name, raising=False)
        mp.setenv("AWS_ACCESS_KEY_ID", "testing")
        mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        mp.setenv("AWS_REGION", "us-east-1")
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        mp.setenv("AWS_ENDPOINT_URL", endpoint)
        mp.setenv("AWS_ENDPOINT_URL_S3", endpoint)
        mp.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no 1 s IMDS probes on a machine without one
        try:
            yield endpoint
        finally:
            server.stop()


_MOTO: dict = {}  # the session's moto server, for s3_faults


class S3Faults:
    """WSGI middleware in front of the session's moto server (in this process, so it sees the
    requests of Ray workers too): records every request and answers chosen ones with a fault.

    inject(path, *faults) queues faults for requests whose path is `path` ("/bucket/key"), or
    starts with it when prefix=True, of any method or only `method`; each such request takes the
    next one until they run out, after which moto answers. A fault is "503" (SlowDown), "500"
    (InternalError), "403" (AccessDenied), "reset" (the connection is dropped with no response) or
    a float (seconds to wait before moto answers: a slow object). forever=FAULT answers every
    matching request with FAULT once the queue is empty (a permanent failure).
    """

    BODIES = {"503": ("503 Slow Down", "SlowDown", "Please reduce your request rate."),
              "500": ("500 Internal Server Error", "InternalError", "We encountered an internal error."),
              "403": ("403 Forbidden", "AccessDenied", "Access Denied")}

    def __init__(self, app):
        import threading

        self.app = app
        self.lock = threading.Lock()
        self.rules: list[dict] = []
        self.fired: list[tuple[str, str, object]] = []  # (method, path, fault)
        self.requests: list[tuple[str, str, str]] = []  # (method, path, Range header)

    def inject(self, path: str, *faults, forever: str | None = None, prefix: bool = False,
               method: str | None = None) -> None:
        with self.lock:
            self.rules.append({"path": path, "prefix": prefix, "method": method, "queue": list(faults),
                               "forever": forever})

    def _fault(self, method: str, path: str):
        for rule in self.rules:
            if rule["method"] not in (None, method):
                continue
            if not (path.startswith(rule["path"]) if rule["prefix"] else path == rule["path"]):
                continue
            if rule["queue"]:
                return rule["queue"].pop(0)
            if rule["forever"] is not None:
                return rule["forever"]
        return None

    def __call__(self, environ, start_response):
        import socket
        import struct
        import time

        method, path = environ["REQUEST_METHOD"], environ.get("PATH_INFO", "")
        with self.lock:
            self.requests.append((method, path, environ.get("HTTP_RANGE", "")))
            fault = self._fault(method, path)
            if fault is not None:
                self.fired.append((method, path, fault))
        if isinstance(fault, float):
            time.sleep(fault)
        elif fault == "reset":
            # No response: the connection is shut at once (the client reads EOF where the status
            # line should be) and, with linger 0, the handler's close then resets it. Without the
            # shutdown werkzeug keeps the connection alive and the client waits out its 60 s timeout.
            sock = environ["werkzeug.socket"]
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.shutdown(socket.SHUT_RDWR)
            raise ConnectionResetError("injected connection reset")  # werkzeug: connection dropped, no response
        elif fault is not None:
            status, code, message = self.BODIES[fault]
            body = f"<Error><Code>{code}</Code><Message>{message}</Message></Error>".encode()
            start_response(status, [("Content-Type", "application/xml"), ("Content-Length", str(len(body)))])
            return [] if method == "HEAD" else [body]
        return self.app(environ, start_response)


@pytest.fixture
def s3_faults(s3_server):
    """An S3Faults in front of the moto server for one test; moto alone again afterwards."""
    wsgi = _MOTO["server"]._server  # werkzeug's server looks its app up per request
    faults = S3Faults(wsgi.app)
    wsgi.app = faults
    try:
        yield faults
    finally:
        wsgi.app = faults.app


@pytest.fixture
def s3_bucket(s3_server: str):
    """A fresh, uniquely named bucket on the moto server; yields "s3://<bucket>"."""
    import uuid

    import boto3

    name = f"promptad-test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    yield f"s3://{name}"


@pytest.fixture(scope="session")
def ray_local(s3_server):
    """One local Ray for the whole session, sized like the machine a user has (2 CPUs here).

    It depends on `s3_server` so that workers see the moto endpoint in their environment.
    Tests that need their own cluster (two nodes, killed drivers) start it themselves in a
    subprocess; everything else shares this one, so Ray starts once per test run.
    """
    import ray

    if not ray.is_initialized():
        # address="local": never join a cluster another process on this machine started.
        ray.init(address="local", include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {k: v for k, v in os.environ.items()
                                           if k.startswith(("AWS_", "HF_HUB_OFFLINE", "RAY_AUTH_MODE"))}})
    yield ray


@pytest.fixture(scope="session")
def tiny_artifact(tmp_path_factory) -> str:
    """A real, untrained 64 px effnet-lite0 artifact of one category ("tile", 4 random images):
    for tests of what a command does with a model before and around scoring."""
    import numpy as np

    from promptad.fit.pipeline import fit_in_process
    from promptad.learning.training import TrainConfig
    from promptad.models.artifact import save_artifact
    from promptad.models.model import ModelConfig

    rng = np.random.default_rng(0)
    fitted = fit_in_process({"tile": rng.integers(0, 255, (4, 64, 64, 3), dtype=np.uint8)},
                            ModelConfig(backbone="effnet-lite0", input_size=64), TrainConfig(epochs=0), log=None)
    uri = str(tmp_path_factory.mktemp("model") / "m")
    save_artifact(fitted, uri)
    return uri
