"""Run a multi-process job (a launcher and its ranks) so that a timeout kills all of it.

``subprocess.run(..., timeout=)`` kills only the process it started: the ranks that
``torch.distributed.run`` (or a script's own spawn) started live on, holding their port and CPU,
and slow every later test. Here the job gets its own process group, killed whole on timeout.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path


def run_job(args: list[str], *, cwd: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    """Run ``args`` in a new session; on timeout kill its whole process group and fail."""
    proc = subprocess.Popen(args, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"{' '.join(args[-2:])} ran past {timeout:.0f} s and was killed "
                             f"with its ranks; its last output:\n{err[-3000:]}") from None
    return subprocess.CompletedProcess(args, proc.returncode, out, err)
