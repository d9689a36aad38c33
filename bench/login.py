"""What a password guess costs the web host: a checked wrong login against a throttled one.

Run from the repository root: `python -m bench.login [--runs N]`. mailpipe's own web app on a
fresh SQLite database (no Redis: the throttle's database store), posting through Flask's test
client. A checked login derives a key (PBKDF2, 600,000 iterations); a throttled one is refused
before that. Prints the median wall time of each and their ratio.
"""

from __future__ import annotations

import argparse
import logging
import re
import statistics
import tempfile
import time
from pathlib import Path

from mailpipe.accounts import create_user
from mailpipe.settings import Settings
from web.app import create_app
from web.throttle import PER_NAME

THROTTLED = 10  # refused attempts per run
LOGIN_TOKEN = re.compile(r'name="login_token" value="([^"]+)"')


def post(client, name: str, address: str) -> tuple[int, float]:
    token = LOGIN_TOKEN.search(client.get("/login").text).group(1)
    started = time.perf_counter()
    response = client.post(
        "/login",
        data={"login_token": token, "username": name, "password": "wrong"},
        environ_base={"REMOTE_ADDR": address},
    )
    return response.status_code, time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.login", description=__doc__)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    logging.getLogger("web.app").setLevel(logging.ERROR)  # one warning per attempt otherwise
    with tempfile.TemporaryDirectory() as workdir:
        settings = Settings(data_dir=Path(workdir))
        app = create_app(settings)
        with app.extensions["mailpipe"].sessions.begin() as session:
            create_user(session, "alice", "the right one")
        client = app.test_client()
        checked, throttled = [], []
        for run in range(args.runs):
            # a fresh name each run: PER_NAME checked failures, then throttled attempts
            name = "alice" if run == 0 else f"guess{run}"
            for attempt in range(PER_NAME + THROTTLED):
                status, seconds = post(client, name, f"192.0.2.{run % 200}")
                (checked if status == 401 else throttled).append(seconds)
                assert status == (401 if attempt < PER_NAME else 429), status
    wrong, refused = statistics.median(checked), statistics.median(throttled)
    print(f"checked wrong login (401): median {wrong * 1000:8.2f} ms over {len(checked)}")
    print(f"throttled login (429):     median {refused * 1000:8.2f} ms over {len(throttled)}")
    print(f"ratio checked/throttled:   {wrong / refused:8.1f} x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
