#!/usr/bin/env bash
# popbridge demo: a local Dovecot IMAP server with sample mail, popbridge in
# front of it, and the commands to fetch that mail with a POP3 client.
# Needs Debian (or Ubuntu) with Rust; installs Dovecot with apt-get if missing.
# Stop with Ctrl-C; everything it started is stopped and removed.
set -euo pipefail
cd "$(dirname "$0")/.."

POP3_PORT="${POP3_PORT:-1110}"
IMAP_PORT="${IMAP_PORT:-11143}"

if ! command -v doveadm >/dev/null 2>&1; then
    echo "demo: installing Dovecot (dovecot-core, dovecot-imapd) with apt-get"
    sudo_cmd=""; [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
    $sudo_cmd apt-get update -qq
    $sudo_cmd env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dovecot-core dovecot-imapd >/dev/null
fi
DOVECOT=$(command -v dovecot || echo /usr/sbin/dovecot)

echo "demo: building popbridge (release)"
cargo build --release --quiet

dir=$(mktemp -d /tmp/popbridge-demo.XXXXXX)
chmod 755 "$dir"                        # Dovecot's auth process must read it
mkdir -m 1777 "$dir/mail"
if [ "$(id -u)" -eq 0 ]; then
    uid=5000; gid=5000; extra=""
else
    uid=$(id -u); gid=$(id -g)
    extra="default_internal_user = $(id -un)
default_internal_group = $(id -gn)
default_login_user = $(id -un)
first_valid_uid = 1
service anvil {
  chroot =
}
service imap-login {
  chroot =
}"
fi
echo 'demo:{PLAIN}demo::::::' > "$dir/users"
chmod 644 "$dir/users"
cat > "$dir/dovecot.conf" <<CONF
instance_name = popbridge-demo-$$
base_dir = $dir/run
state_dir = $dir/state
log_path = $dir/dovecot.log
protocols = imap
listen = 127.0.0.1
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain login
mail_location = maildir:$dir/mail/%u/Maildir
passdb {
  driver = passwd-file
  args = scheme=PLAIN $dir/users
}
userdb {
  driver = passwd-file
  args = $dir/users
  default_fields = uid=$uid gid=$gid home=$dir/mail/%u
}
service imap-login {
  inet_listener imap {
    port = $IMAP_PORT
  }
  inet_listener imaps {
    port = 0
  }
}
$extra
CONF

pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$dir"
}
trap cleanup EXIT INT TERM

"$DOVECOT" -F -c "$dir/dovecot.conf" &
pids+=($!)
for _ in $(seq 100); do
    (exec 3<>/dev/tcp/127.0.0.1/"$IMAP_PORT") 2>/dev/null && break
    sleep 0.1
done

for i in 1 2 3; do
    printf 'From: Sender %s <sender%s@example.org>\nTo: demo@example.org\nSubject: Sample message %s\nDate: Thu, 26 Nov 2026 10:0%s:00 +0000\nMessage-ID: <demo-%s@example.org>\n\nHello from popbridge, message %s.\n.A line that starts with a dot.\n' \
        "$i" "$i" "$i" "$i" "$i" "$i" | doveadm -c "$dir/dovecot.conf" save -u demo
done

"${CARGO_TARGET_DIR:-target}/release/popbridge" --listen "127.0.0.1:$POP3_PORT" \
    --upstream "127.0.0.1:$IMAP_PORT" --upstream-tls none &
pids+=($!)
for _ in $(seq 100); do
    (exec 3<>/dev/tcp/127.0.0.1/"$POP3_PORT") 2>/dev/null && break
    sleep 0.1
done

cat <<MSG

popbridge is serving POP3 on 127.0.0.1:$POP3_PORT from the IMAP mailbox of
user "demo" (password "demo") on a local Dovecot (127.0.0.1:$IMAP_PORT).

Try, in another terminal:
  curl pop3://demo:demo@127.0.0.1:$POP3_PORT/        # list messages
  curl pop3://demo:demo@127.0.0.1:$POP3_PORT/1       # fetch message 1
  python3 -c "import poplib; p=poplib.POP3('127.0.0.1',$POP3_PORT); p.user('demo'); p.pass_('demo'); print(p.uidl()); print(b'\n'.join(p.retr(1)[1]).decode()); p.quit()"

Press Ctrl-C to stop.
MSG
wait "${pids[1]}"
