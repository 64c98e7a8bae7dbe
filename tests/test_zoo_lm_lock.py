"""The LM zoo's build lock (zoo.lm._exclusive): it names its holder while waiting, gives up after
its timeout, and takes over a lock whose holder process is gone. Ground truth: a lock held by
this test through its own file descriptor (flock locks are per open file), and a process that
has exited."""

import logging
import os
import socket
import subprocess
import sys
import threading

import pytest

fcntl = pytest.importorskip("fcntl")

from map_merge.zoo.lm import _exclusive  # noqa: E402


def hold(path, pid):
    """Lock ``path`` as another holder would: its own open file, ``pid@host`` inside."""
    handle = open(path, "a+")
    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    handle.write(f"{pid}@{socket.gethostname()}\n")
    handle.flush()
    return handle


def test_a_waiter_warns_naming_lock_and_holder_then_gives_up(tmp_path, caplog):
    path = tmp_path / "zoo.lock"
    holder = hold(path, os.getppid())  # a live process other than this one
    try:
        with caplog.at_level(logging.WARNING, logger="map_merge.zoo.lm"):
            with pytest.raises(TimeoutError, match=rf"waiting for the lock {path} of the lm zoo zoo, held by process "
                                                   rf"{os.getppid()} on .*delete the lock file"):
                with _exclusive(path, "zoo", timeout_s=0.3, poll_s=0.05):
                    pytest.fail("entered a lock another process holds")
        waiting = [r for r in caplog.records if r.levelno == logging.WARNING and "waiting for the lock" in r.getMessage()]
        assert waiting and str(path) in waiting[0].getMessage() and f"process {os.getppid()}" in waiting[0].getMessage()
    finally:
        holder.close()
    with _exclusive(path, "zoo", timeout_s=0.3):  # released: taken at once, naming this process while held
        assert path.read_text().strip() == f"{os.getpid()}@{socket.gethostname()}"
    assert path.read_text() == ""


def test_a_lock_whose_holder_is_gone_is_taken_over(tmp_path, caplog):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    path = tmp_path / "zoo.lock"
    inherited = hold(path, gone.pid)  # the lock lives on in a child that inherited the dead holder's file
    entered = []

    def take():
        with _exclusive(path, "zoo", timeout_s=20, poll_s=0.05):
            entered.append(path.read_text().strip())

    try:
        with caplog.at_level(logging.WARNING, logger="map_merge.zoo.lm"):
            thread = threading.Thread(target=take, daemon=True)  # the old lock waited forever: bound the wait
            thread.start()
            thread.join(timeout=15)
        assert not thread.is_alive() and entered == [f"{os.getpid()}@{socket.gethostname()}"]
        assert any(f"held for process {gone.pid}" in r.getMessage() and "taking it over" in r.getMessage() for r in caplog.records)
    finally:
        inherited.close()


def test_the_lock_excludes_a_second_holder_until_released(tmp_path):
    path = tmp_path / "zoo.lock"
    order = []
    inside = threading.Event()

    def first():
        with _exclusive(path, "zoo", timeout_s=20, poll_s=0.02):
            order.append("first in")
            inside.set()
            threading.Event().wait(0.3)
            order.append("first out")

    thread = threading.Thread(target=first)
    thread.start()
    inside.wait(10)
    with _exclusive(path, "zoo", timeout_s=20, poll_s=0.02):  # flock locks per open file: threads exclude each other too
        order.append("second in")
    thread.join()
    assert order == ["first in", "first out", "second in"]
