"""``python kill_worker.py ARGS...`` runs ``diffcr ARGS...`` and SIGKILLs itself at the
``KILL_AT``-th file-system commit event (each ``os.fsync`` and ``os.replace``: inside every
checkpoint write, between its files and at its rename); ``KILL_AT=0`` never kills and writes
the number of events to ``KILL_EVENTS_OUT``. Under ``torchrun`` (one worker per process) only
the process of rank ``KILL_RANK`` (0) counts, kills itself and writes the count. Used by tests/app/test_kill.py."""
import os
import runpy
import signal
import sys

# under torchrun only the process of rank KILL_RANK (default 0) counts and kills
_mine = os.environ.get("RANK", "0") == os.environ.get("KILL_RANK", "0")
_at = int(os.environ.get("KILL_AT", "0")) if _mine else 0
_n = [0]


def _event():
    _n[0] += 1
    if _at and _n[0] == _at:
        os.kill(os.getpid(), signal.SIGKILL)


def _wrap(fn):
    def wrapped(*a, **k):
        _event()
        out = fn(*a, **k)
        return out
    return wrapped


os.fsync = _wrap(os.fsync)
os.replace = _wrap(os.replace)

if __name__ == "__main__":
    sys.argv = ["diffcr"] + sys.argv[1:]
    try:
        runpy.run_module("diffcr", run_name="__main__")
    finally:
        if os.environ.get("KILL_EVENTS_OUT") and _mine:
            with open(os.environ["KILL_EVENTS_OUT"], "w") as f:
                f.write(str(_n[0]))
