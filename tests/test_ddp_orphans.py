"""torchrun workers exit when the launcher itself is SIGKILLed (utils.dist.exit_with_parent)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.helpers import child_env

pytestmark = pytest.mark.slow


def _children(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                out.append(int(d.name))
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_workers_exit_when_the_launcher_is_killed(tiny_config, tmp_path):
    torchrun = shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun not on PATH")
    cfg = tiny_config(max_epoch=200, eval={"svm_every": 0}, log={"progress_bar": False, "tensorboard": False})
    run = tmp_path / "ddp"
    env = child_env(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    launcher = subprocess.Popen([torchrun, "--standalone", "--nproc_per_node", "2", "main_pretrain.py", "--config",
                                 str(cfg), "--run_dir", str(run), "device=cpu"], cwd=REPO, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    workers: list[int] = []
    try:
        deadline = time.time() + 180
        while time.time() < deadline:  # both workers started and past init_distributed (the log exists)
            workers = _children(launcher.pid)
            if len(workers) == 2 and (run / "pretrain.log").exists():
                break
            assert launcher.poll() is None, "torchrun exited early"
            time.sleep(0.5)
        assert len(workers) == 2 and (run / "pretrain.log").exists(), workers
        os.kill(launcher.pid, signal.SIGKILL)
        launcher.wait()
        deadline = time.time() + 10
        while time.time() < deadline and any(_alive(p) for p in workers):
            time.sleep(0.2)
        assert not any(_alive(p) for p in workers), f"orphaned workers still running: {workers}"
    finally:
        for p in workers:
            if _alive(p):
                os.kill(p, signal.SIGKILL)
        if launcher.poll() is None:
            launcher.kill()


def test_watchdog_fallback_signals_when_the_parent_changes():
    """Without prctl the watchdog thread notices the new parent: run it in a grandchild whose parent exits."""
    code = (
        "import os, signal, sys, time\n"
        "import utils.dist as d\n"
        "if os.fork():\n"
        "    time.sleep(1.0); os._exit(0)\n"  # the parent dies after 1 s
        "d.sys = type('S', (), {'platform': 'other'})\n"  # force the fallback
        "print(d.exit_with_parent(poll_s=0.1), os.getpid(), flush=True)\n"
        "time.sleep(30)\n"
    )
    p = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=child_env(), stdout=subprocess.PIPE, text=True)
    mech, pid = p.stdout.readline().split()
    p.wait(timeout=10)
    assert mech == "watchdog"
    deadline = time.time() + 5
    while time.time() < deadline and _alive(int(pid)):
        time.sleep(0.1)
    alive = _alive(int(pid))
    if alive:
        os.kill(int(pid), signal.SIGKILL)
    assert not alive
