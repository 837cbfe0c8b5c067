"""Loads scripts/compat_plugin.py at interpreter start-up in a compat run's pytest process.

A library's own pytest configuration may import the library before any pytest plugin
loads (urllib3's ``filterwarnings`` name ``urllib3.exceptions.HTTPWarning``, which pytest
imports to read them): poolwatch must be on before that. Only the first process started
with this on its path loads it; processes the tests start inherit the marker and do not.
"""

import os

if os.environ.get("POOLWATCH_COMPAT_MODE") and "POOLWATCH_COMPAT_PID" not in os.environ:
    os.environ["POOLWATCH_COMPAT_PID"] = str(os.getpid())
    import compat_plugin  # noqa: F401 (instruments now in the instrumented mode)
