"""The guards of a directory a command writes: one writer at a time (``DIR/.lock``), and the
paths refused before anything is touched."""

import json
import logging
import os
import signal
import subprocess
import sys

import pytest

from qflax.runs import (
    LOCK_FILE,
    DirInUseError,
    check_output_dir,
    check_run_dir,
    lock_dir,
)

# A process that takes the lock as qflax does (flock, then its details), then waits.
HOLDER = """
import fcntl, json, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
holder = {"pid": os.getpid(), "host": sys.argv[2], "since": "2026-01-01T00:00:00+00:00",
          "command": "qflax train --workdir w"}
os.pwrite(fd, json.dumps(holder).encode(), 0)
print("locked", flush=True)
time.sleep(60)
"""


def _hold_in_child(tmp_path):
    import socket

    child = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(tmp_path / LOCK_FILE), socket.gethostname()],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout.readline().strip() == "locked"
    return child


def test_a_second_writer_is_refused_naming_the_holder(tmp_path):
    with lock_dir(tmp_path, command="qflax train --workdir x"):
        holder = json.loads((tmp_path / LOCK_FILE).read_text())
        assert holder["pid"] == os.getpid() and holder["command"] == "qflax train --workdir x"
        # flock is per open file: a second lock in this process conflicts like another process
        with pytest.raises(
            DirInUseError, match=rf"in use by another qflax run: pid {os.getpid()} "
        ):
            with lock_dir(tmp_path):
                pass
    assert (tmp_path / LOCK_FILE).read_text() == ""  # released and emptied
    with lock_dir(tmp_path):  # free again
        pass


def test_another_process_holding_the_lock_is_named(tmp_path):
    child = _hold_in_child(tmp_path)
    try:
        with pytest.raises(DirInUseError) as info:
            with lock_dir(tmp_path):
                pass
    finally:
        child.kill()
        child.wait()
    message = str(info.value)
    assert "\n" not in message
    assert f"pid {child.pid} on " in message and "since 2026-01-01T00:00:00+00:00" in message
    assert "(qflax train --workdir w)" in message


def test_the_lock_of_a_killed_process_is_taken_over_with_a_warning(tmp_path, caplog):
    child = _hold_in_child(tmp_path)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    with caplog.at_level(logging.WARNING, logger="qflax.runs"):
        with lock_dir(tmp_path):
            assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert f"taking over the lock left by pid {child.pid}" in caplog.text
    assert "no longer running" in caplog.text


@pytest.mark.parametrize("path", ["", "   "])
def test_an_empty_path_is_refused(path):
    with pytest.raises(ValueError, match=r"workdir='\s*' is empty; allowed: a directory path"):
        check_output_dir(path)


def test_a_file_is_refused(tmp_path):
    file = tmp_path / "f.txt"
    file.write_text("mine")
    with pytest.raises(ValueError, match=r"out='.*f.txt' is an existing file"):
        check_output_dir(file, option="out")
    with pytest.raises(ValueError, match=r"cannot be created: '.*f.txt' is a file"):
        check_output_dir(file / "run")
    assert file.read_text() == "mine"


def test_an_unwritable_directory_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    with pytest.raises(ValueError, match=r"'.*run' is not writable \(its parent '.*' is not\)"):
        check_output_dir(tmp_path / "run")
    with pytest.raises(ValueError, match=r"workdir='.*' is not writable; allowed"):
        check_output_dir(tmp_path)


def test_new_empty_and_qflax_run_folders_are_accepted(tmp_path):
    check_run_dir(tmp_path / "new")
    check_run_dir(tmp_path)
    (tmp_path / LOCK_FILE).write_text("")
    check_run_dir(tmp_path)  # only a lock file: still empty
    config = {"dataset": "digits", "model": "mlp", "epochs": 1, "quant": {}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    check_run_dir(tmp_path)
    (tmp_path / "config.json").unlink()
    (tmp_path / "metrics.jsonl").write_text("")
    check_run_dir(tmp_path)


@pytest.mark.parametrize(
    "files, reason",
    [
        ({"config.json": '{"mine": 1}'}, "its config.json is not a qflax config"),
        ({"config.json": "not json", "metrics.jsonl": ""}, "its config.json is not a qflax"),
        ({"notes.txt": "hello"}, "it holds only other entries: notes.txt"),
    ],
)
def test_a_folder_holding_no_qflax_run_is_refused(files, reason, tmp_path):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(ValueError, match=rf"is not empty and holds no qflax run \({reason}"):
        check_run_dir(tmp_path)
