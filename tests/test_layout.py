"""The core knows nothing of queues or metrics: importing it loads neither library."""

import subprocess
import sys

PROBE = """
import importlib, pkgutil, sys
import mailpipe
for module in pkgutil.walk_packages(mailpipe.__path__, "mailpipe."):
    if module.name.startswith("mailpipe.migrations"):
        continue
    importlib.import_module(module.name)
print(",".join(sorted(m for m in sys.modules if m.split(".")[0] in ("dramatiq", "prometheus_client", "periodiq"))))
"""


def test_core_imports_no_queue_or_metrics_library():
    result = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == ""
