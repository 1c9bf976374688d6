"""console.py without a Ray cluster: where Ray's Python logs, warnings from Ray's code and C++
writes to fd 2 go, with and without --verbose, and that the console is restored afterwards.
(The whole demo's console is checked in test_demo.py.)"""
from __future__ import annotations

import logging
import os
import warnings

import pytest

from promptad import console


@pytest.fixture
def ray_logger():
    """Ray's "ray" logger as `import ray` leaves it: a console handler."""
    import ray  # noqa: F401

    logger = logging.getLogger("ray")
    assert any(type(h).__name__ == "PlainRayHandler" for h in logger.handlers)
    before = list(logger.handlers)
    yield logger
    for h in list(logger.handlers):  # the session's file handler stays on purpose; not in other tests
        if h not in before:
            logger.removeHandler(h)
    for h in before:
        if h not in logger.handlers:
            logger.addHandler(h)


def test_quiet_session_sends_ray_logs_warnings_and_fd2_to_the_log_file(tmp_path, ray_logger, capfd):
    with console.session("score", verbose=False) as session:
        console.set_log_dir(str(tmp_path))
        session.prepare_for_ray()
        ray_logger.warning("a Ray internal line")
        warnings.showwarning(DeprecationWarning("old API"), DeprecationWarning,
                             os.path.join("site-packages", "ray", "data", "x.py"), 1)
        os.write(2, b"[core_worker.cc:1] a C++ line\n")
        print("our own line")
        closing = session.closing_line()
    out, err = capfd.readouterr()
    assert out == "our own line\n" and err == ""
    text = open(session.log_path).read()
    assert "a Ray internal line" in text and "old API" in text and "core_worker.cc:1" in text
    assert session.log_path.startswith(str(tmp_path)) and closing.startswith(f"promptad: Ray's logs: {session.log_path}")
    os.write(2, b"after the session\n")  # fd 2 is the terminal again
    assert capfd.readouterr().err == "after the session\n"


def test_verbose_session_keeps_ray_on_the_console_and_in_the_file(tmp_path, ray_logger):
    with console.session("fit", verbose=True) as session:
        console.set_log_dir(str(tmp_path))
        session.prepare_for_ray()
        assert session.ray_init_kwargs() == {"log_to_driver": True} and session._saved_fd is None  # fd 2 untouched
        assert any(type(h).__name__ == "PlainRayHandler" for h in ray_logger.handlers)  # still on the console
        ray_logger.warning("shown and kept")
    assert "shown and kept" in open(session.log_path).read()
    assert "--verbose" in session.closing_line()


def test_no_log_file_and_no_closing_line_when_ray_never_started(tmp_path):
    with console.session("score") as session:
        console.set_log_dir(str(tmp_path))
        assert session.ray_init_kwargs() == {"log_to_driver": False}
    assert session.closing_line() is None and not os.listdir(tmp_path)


def test_counted_puts_the_noun_in_the_right_number():
    assert [console.counted(n, "epoch") for n in (0, 1, 2)] == ["0 epochs", "1 epoch", "2 epochs"]
    assert console.counted(1, "category", "categories") == "1 category"
    assert console.counted(3, "category", "categories") == "3 categories"
    assert [console.counted(c, "CPU") for c in (0.5, 1.0, 2.0)] == ["0.5 CPUs", "1 CPU", "2 CPUs"]
