"""CPU per no-change account run through the whole pipeline (for docs/capacity.md).

Run from the repository root: `python -m bench.poll [ACCOUNTS] [--profile]`. One job covers
every account (3 messages each), run by an in-process worker on PostgreSQL; rounds 2 and 3 find
nothing new. Prints the worker CPU time and wall time per account run for each round; with
`--profile`, cProfile runs in every thread of the worker during the last (no-change) round and
the functions that took the most CPU time, their own and with callees, are printed after it.
"""

import cProfile
import pstats
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

import dramatiq
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

import broker_config
from actors import PipelineBroker
from mailpipe import db, grants
from mailpipe.accounts import add_account, create_user
from mailpipe.imap import ImapSettings
from tests.support import postgres
from tests.support.dovecot import Dovecot
from tests.support.policy import LOOPBACK
from worker import runtime

ROUNDS = 3


TOP = 30


class ThreadProfiles:
    """One cProfile per thread that starts while it is installed (cProfile sees one thread)."""

    def __init__(self) -> None:
        self.profiles: list[cProfile.Profile] = []

    def install(self) -> None:
        threading.setprofile(self._start)

    def _start(self, *_args: object) -> None:
        sys.setprofile(None)
        profile = cProfile.Profile(time.thread_time)  # CPU, not the waits on IMAP and SQL
        self.profiles.append(profile)
        profile.enable()

    def uninstall(self) -> None:
        """Threads started from now on run without; the profiled ones have ended by then."""
        threading.setprofile(None)

    def print(self) -> None:
        stats = pstats.Stats(*self.profiles)
        stats.sort_stats("tottime").print_stats(TOP)
        stats.sort_stats("cumulative").print_stats(TOP)


def main() -> int:
    args = [arg for arg in sys.argv[1:] if arg != "--profile"]
    accounts = int(args[0]) if args else 200
    profiles = ThreadProfiles() if "--profile" in sys.argv[1:] else None
    with Dovecot.start(Path(tempfile.gettempdir())) as server:
        boxes = [server.new_user() for _ in range(accounts)]
        for login, _password in boxes:
            server.seed_maildir(login, 3)
        name = postgres.create_database()
        engine = db.make_engine(postgres.database_url(postgres.ADMIN_URL, name))
        try:
            db.migrate(engine)
            sessions = db.session_factory(engine)
            private_key = X25519PrivateKey.generate()
            # the benchmark's own Dovecot listens on loopback: allow it, as tests/conftest.py does
            settings = replace(broker_config.SETTINGS, address_policy=LOOPBACK)
            runtime.configure(settings, sessions=sessions, private_key=private_key)
            with sessions.begin() as session:
                user, key = create_user(session, "bench", "pw", iterations=1000)
                for login, password in boxes:
                    account = ImapSettings(
                        host=server.host,
                        port=server.port,
                        username=login,
                        password=password,
                        security="none",
                    )
                    add_account(session, user, key, account)
                user_id = user.id
            worker = dramatiq.Worker(broker_config.broker, worker_threads=8)
            pipeline = PipelineBroker(
                sessions,
                settings=settings,
                public_key=grants.public_key_bytes(private_key),
            )
            for number in range(1, ROUNDS + 1):
                if number == ROUNDS and profiles is not None:
                    worker.stop()  # the last round's threads start with a profile of their own
                    profiles.install()
                    worker = dramatiq.Worker(broker_config.broker, worker_threads=8)
                if number == 1 or (number == ROUNDS and profiles is not None):
                    worker.start()
                cpu, wall = time.process_time(), time.perf_counter()
                job = pipeline.enqueue_fetch_job(user_id, key=key)
                broker_config.broker.join("fetch")
                worker.join()
                status = pipeline.get_job_status(job, user_id)
                print(
                    f"round {number}: {status.status}, {status.emails_fetched} mails; "
                    f"CPU {1000 * (time.process_time() - cpu) / accounts:.1f} ms and wall "
                    f"{1000 * (time.perf_counter() - wall) / accounts:.1f} ms per account run"
                )
            worker.stop()
            if profiles is not None:
                profiles.uninstall()
                profiles.print()
        finally:
            engine.dispose()
            postgres.drop_database(name)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
