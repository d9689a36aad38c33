#!/usr/bin/env bash
# Our `mailpipe sync` beside mbsync, offlineimap, getmail6 and raw imapclient on one mailbox,
# side by side in one run (../shared/bench/peers.py). Installs the peers (Debian) when absent;
# needs root, as on the project's machines. Usage: bench/peers.sh [MESSAGES] [RUNS]
set -euo pipefail
cd "$(dirname "$0")/.."
MESSAGES=${1:-10000}
RUNS=${2:-3}
SHARED=../shared/bench
PEERS=(isync offlineimap getmail6)
missing=()
for pkg in "${PEERS[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
DIR=$(mktemp -d /tmp/mailpipe-peers.XXXXXX)
chmod 755 "$DIR"  # Dovecot's auth process reads the users file as its own user
PORT=$(.venv/bin/python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
trap 'kill "$(cat "$DIR/run/master.pid" 2>/dev/null)" 2>/dev/null || true; [ -n "${KEEP:-}" ] || rm -rf "$DIR"' EXIT
DIR=$DIR PORT=$PORT bash "$SHARED/dovecot-up.sh" >/dev/null
echo "b10000:{PLAIN}secret" > "$DIR/users"
python3 "$SHARED/seed_maildir.py" "$DIR/mail/b10000/Maildir" "$MESSAGES"
chown -R vmail:vmail "$DIR/mail"
python3 "$SHARED/peers.py" --user b10000 --password secret --port "$PORT" --runs "$RUNS" \
  --messages "$MESSAGES" --python "$PWD/.venv/bin/python" \
  --ours "$PWD/.venv/bin/mailpipe sync --host {host} --port {port} --user {user} \
--password-env MAILPIPE_PEER_PASSWORD --security none --db sqlite:///{run}/mailpipe.db"
