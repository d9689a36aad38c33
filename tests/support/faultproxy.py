"""The fault proxy lives in the package (the demo's flaky link uses it too); tests import it here."""

from mailpipe.faultproxy import FaultProxy

__all__ = ["FaultProxy"]
