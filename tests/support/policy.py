"""The address allowance the tests run under, said once: every test server listens on loopback.

Workers, web apps and commands started by the tests read it from `MAILPIPE_ALLOW_PRIVATE_HOSTS`
(tests/conftest.py sets it); tests that call the core directly pass `LOOPBACK`. Tests of the
policy itself build their own, without it.
"""

from __future__ import annotations

from mailpipe.addresses import AddressPolicy

LOOPBACK_HOSTS = "127.0.0.1,::1"
LOOPBACK = AddressPolicy(allow=tuple(LOOPBACK_HOSTS.split(",")))
