"""The core knows nothing of queues or metrics: importing it loads neither library."""

import subprocess
import sys

PROBE = """
import importlib, pkgutil, sys
import mailpipe
for module in pkgutil.walk_packages(mailpipe.__path__, "mailpipe."):
    if module.name.startswith("mailpipe.migrations") or module.name == "mailpipe.__main__":
        continue
    importlib.import_module(module.name)
print(",".join(sorted(m for m in sys.modules if m.split(".")[0] in ("dramatiq", "prometheus_client", "periodiq"))))
"""


def test_core_imports_no_queue_or_metrics_library():
    result = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == ""


def test_the_command_line_loads_x509_only_to_read_a_certificate():
    # Given a fresh interpreter
    probe = "import sys, mailpipe.cli; print('cryptography.x509' in sys.modules)"
    # When it loads the command line (as `mailpipe --help` does)
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    )
    # Then the certificate parser is not loaded: only a TLS check that reads a certificate needs it
    assert result.stdout.strip() == "False"
