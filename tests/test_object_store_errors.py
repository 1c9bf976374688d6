"""Object-store mistakes are one line and exit 2 within seconds (issue 34): before, `score`
with an S3 input and no reachable endpoint printed pyarrow's traceback (AWS Error
NETWORK_CONNECTION during HeadObject) and exited 1 after 68-93 s of the SDK's retries."""
from __future__ import annotations

import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from promptad.cli import main
from promptad.data import storage

LIMIT_S = 30  # what the issue allows; each case here takes a few seconds


def _one_line(argv: list[str], capsys) -> tuple[str, float]:
    t0 = time.monotonic()
    status = main(argv)
    took = time.monotonic() - t0
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert status == 2 and len(lines) == 1 and "Traceback" not in err, (status, err)
    assert lines[0].startswith("promptad: error: ")
    return lines[0], took


@pytest.fixture
def s3_env(monkeypatch):
    """Fake keys and no instance metadata, so nothing waits on an IMDS lookup; returns a setter of
    the endpoint."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    return lambda url: monkeypatch.setenv("AWS_ENDPOINT_URL_S3", url)


@pytest.fixture
def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def denying_server():
    """An S3 endpoint that answers every request 403 AccessDenied (a role without the permission)."""
    class Deny(BaseHTTPRequestHandler):
        def _deny(self) -> None:
            body = b"<Error><Code>AccessDenied</Code><Message>Access Denied</Message></Error>"
            self.send_response(403)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        do_GET = do_HEAD = do_PUT = do_POST = _deny

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Deny)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture(scope="module")
def model(tiny_artifact) -> str:
    return tiny_artifact


def test_no_endpoint_is_one_line_in_seconds(s3_env, closed_port, model, tmp_path, capsys):
    s3_env(f"http://127.0.0.1:{closed_port}")
    line, took = _one_line(["score", "--model", model, "--input", "s3://archive/images/",
                            "--output", str(tmp_path / "out")], capsys)
    assert "--input s3://archive/images/: cannot reach the object store at http://127.0.0.1:" in line, line
    assert took < LIMIT_S, took
    line, took = _one_line(["fit", "--data", "s3://data/mvtec", "--category", "tile", "--out",
                            str(tmp_path / "m")], capsys)
    assert "--data s3://data/mvtec: cannot reach the object store" in line and took < LIMIT_S, (line, took)


def test_access_denied_and_no_credentials_are_one_line(s3_env, denying_server, monkeypatch, tmp_path, capsys):
    s3_env(denying_server)
    argv = ["score", "--model", "s3://models/m", "--input", str(tmp_path), "--output", str(tmp_path / "out")]
    line, took = _one_line(argv, capsys)
    assert "--model s3://models/m: access denied" in line and took < LIMIT_S, (line, took)
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    line, took = _one_line(argv, capsys)
    assert "access denied" in line and "none found" in line and took < LIMIT_S, (line, took)


def test_missing_bucket_is_one_line(s3_server, tmp_path, capsys):
    line, _ = _one_line(["audit", "--model", "s3://no-such-bucket-34/m", "--data", str(tmp_path),
                         "--report", str(tmp_path / "r")], capsys)
    assert "--model s3://no-such-bucket-34/m: bucket no-such-bucket-34 does not exist" in line, line


def test_an_object_store_error_past_the_preflight_is_one_line(monkeypatch, capsys):
    """Whatever S3 call fails later (an outage after the preflight) still ends as one line, exit 2."""
    import promptad.score.command as score_command

    def outage(args):
        raise OSError("When getting information for key 'k' in bucket 'b': AWS Error NETWORK_CONNECTION during "
                      "HeadObject operation: curlCode: 7, Could not connect to server")

    monkeypatch.setattr(score_command, "run", outage)
    line, _ = _one_line(["score", "--model", "m", "--input", "i", "--output", "o"], capsys)
    assert "cannot reach the object store" in line
    assert storage.s3_error_reason(ValueError("AWS Error ACCESS_DENIED during ListObjectsV2")).startswith("access denied")
    assert storage.s3_error_reason(ValueError("a plain bug")) is None
