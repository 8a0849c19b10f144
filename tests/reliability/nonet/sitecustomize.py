"""Put this folder on ``PYTHONPATH`` to run every Python process offline (see ``../offline.py``); a process that
attempted the network (even if it swallowed the error) says so on stderr when it exits."""

import atexit as _atexit
import importlib.util as _u
import os as _os
import sys as _sys

_spec = _u.spec_from_file_location("_epd_offline", _os.path.join(_os.path.dirname(__file__), "..", "offline.py"))
_mod = _u.module_from_spec(_spec)
_spec.loader.exec_module(_mod)
_mod.install()


@_atexit.register
def _report():
    if _mod.ATTEMPTS:
        print(f"[offline] blocked network attempts in {_sys.argv[:2]}: {_mod.ATTEMPTS}", file=_sys.stderr)
