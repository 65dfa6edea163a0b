#!/usr/bin/env python3
"""A small but real OAuth 2.0 authorization server for popbridge's tests.

Standard library only. Binds 127.0.0.1 (never anything else), prints
``READY <port>`` on stdout once it listens, logs one line per request to
stderr (method, path, status; never a token, code or secret).

Endpoints (form-encoded POST bodies, JSON answers):
  POST /device_authorization   RFC 8628 §3.1-3.2
  POST /token                  RFC 6749 §4.1.3 (authorization_code + RFC 7636
                               PKCE S256), §6 (refresh_token, with rotation),
                               RFC 8628 §3.4-3.5 (device_code)
  GET  /authorize              RFC 6749 §4.1.1 (auto-approves; loopback
                               redirect_uri only, RFC 8252 §7.3; PKCE S256
                               required)
  POST /introspect             RFC 7662 (what Dovecot's oauth2 passdb calls)
  POST /revoke                 RFC 7009
Test control (JSON bodies and answers), see TestControl below:
  POST /test/approve {user_code, account}     POST /test/deny {user_code}
  POST /test/expire_access                     POST /test/expire_device_codes
  POST /test/revoke_refresh {account?}         POST /test/throttle {count}
  POST /test/fail_introspection {count}        POST /test/default_user {account}
  POST /test/config {reuse_revokes_family?, interval?}
  GET  /test/stats

Rotation: every refresh issues a new refresh token and invalidates the old
one. Presenting an invalidated (rotated) refresh token again answers
invalid_grant; with --reuse-revokes-family (OAuth 2.0 Security BCP,
RFC 9700 §4.14.2) it also revokes every token of that grant (the newest
refresh token and its access tokens), so tests can tell "newest kept" from
"family revoked".

Throttling (/test/throttle N): the next N requests to /token and
/device_authorization answer HTTP 429 with ``Retry-After: 1`` and
``{"error": "temporarily_unavailable"}`` (the RFC 6749 §4.1.2.1 code; the
token endpoint has no registered code for it, 429 is what providers send).

Introspection only ever reports access tokens as active: a refresh token
presented as a bearer token is {"active": false}.
"""

import argparse
import base64
import hashlib
import json
import re
import secrets
import sys
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
# RFC 8628 §6.1: a user code from a 20-letter consonant alphabet, 8 letters.
USER_CODE_ALPHABET = "BCDFGHJKLMNPQRSTVWXZ"
# RFC 7636 §4.1: code_verifier = 43*128unreserved.
VERIFIER_RE = re.compile(r"^[A-Za-z0-9\-._~]{43,128}$")
# Maximum request body we read (the requests here are a few hundred bytes).
MAX_BODY = 64 * 1024
# RFC 6749 §4.1.2: authorization codes are short-lived ("10 minutes max").
AUTH_CODE_TTL = 60


class OAuthError(Exception):
    """An RFC 6749 §5.2 error answer."""

    def __init__(self, error, description, status=400, headers=None):
        super().__init__(error)
        self.error = error
        self.description = description
        self.status = status
        self.headers = headers or {}


class State:
    """All server state, guarded by one lock."""

    def __init__(self, args):
        self.lock = threading.Lock()
        self.args = args
        self.interval = args.interval
        self.reuse_revokes_family = args.reuse_revokes_family
        self.default_account = None
        self.devices = {}  # device_code -> dict
        self.user_codes = {}  # normalised user_code -> device_code
        self.codes = {}  # authorization code -> dict
        self.access = {}  # access token -> dict
        self.refresh = {}  # refresh token -> dict
        self.throttle = 0
        self.fail_introspection = 0
        self.stats = {
            "grants": {"device_code": 0, "authorization_code": 0, "refresh_token": 0},
            "token_errors": {},
            "device_authorizations": 0,
            "device_polls": 0,
            "authorizations": 0,
            "introspections": 0,
            "introspections_active": 0,
            "revocations": 0,
            "throttled": 0,
            "refresh_reuse": 0,
        }


def normalise_user_code(code):
    # RFC 8628 §6.1: case-insensitive, punctuation ignored.
    return re.sub(r"[^A-Z]", "", code.upper())


def new_user_code():
    letters = "".join(secrets.choice(USER_CODE_ALPHABET) for _ in range(8))
    return letters[:4] + "-" + letters[4:]


def b64url_sha256(text):
    digest = hashlib.sha256(text.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def is_loopback_redirect(uri):
    # RFC 8252 §7.3 / §8.3: loopback redirect over http with any port.
    try:
        parts = urllib.parse.urlsplit(uri)
    except ValueError:
        return False
    return (
        parts.scheme == "http"
        and parts.hostname in ("127.0.0.1", "::1", "localhost")
        and parts.fragment == ""
    )


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "popbridge-test-oauth/1"
    state = None  # set in main()

    # ---------------------------------------------------------------- output
    def log_message(self, fmt, *args):  # noqa: N802 (stdlib name)
        pass  # replaced by log_line, which never prints query strings

    def log_line(self, status, note=""):
        path = urllib.parse.urlsplit(self.path).path
        sys.stderr.write(
            "%s %s %s %d %s (content-type %s, auth %s)\n"
            % (
                time.strftime("%H:%M:%S"),
                self.command,
                path,
                status,
                note,
                self.headers.get("Content-Type", "-"),
                # The scheme only, never the credentials.
                (self.headers.get("Authorization") or "-").split(" ")[0],
            )
        )
        sys.stderr.flush()

    def send_json(self, status, obj, headers=None, note=""):
        body = json.dumps(obj).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        # RFC 6749 §5.1: token answers must not be cached.
        self.send_header("Cache-Control", "no-store")
        self.send_header("Pragma", "no-cache")
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)
        self.log_line(status, note)

    def send_error_json(self, err):
        self.send_json(
            err.status,
            {"error": err.error, "error_description": err.description},
            err.headers,
            note="error=" + err.error,
        )
        if self.urlpath() == "/token":
            with self.state.lock:
                errs = self.state.stats["token_errors"]
                errs[err.error] = errs.get(err.error, 0) + 1

    def send_redirect(self, location, note):
        self.send_response(302)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()
        self.log_line(302, note)

    def send_plain(self, status, text):
        body = text.encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        self.log_line(status)

    # ----------------------------------------------------------------- input
    def urlpath(self):
        return urllib.parse.urlsplit(self.path).path

    def read_body(self):
        length = self.headers.get("Content-Length")
        if length is None:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                return self.read_chunked()
            return b""
        try:
            n = int(length)
        except ValueError:
            raise OAuthError("invalid_request", "bad Content-Length")
        if n < 0 or n > MAX_BODY:
            # The body stays unread, so this connection cannot go on.
            self.close_connection = True
            raise OAuthError("invalid_request", "request body too large")
        return self.rfile.read(n)

    def read_chunked(self):
        out = b""
        while True:
            line = self.rfile.readline(1024)
            size = int(line.split(b";")[0].strip() or b"0", 16)
            if size == 0:
                # trailers up to the empty line
                while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                    pass
                return out
            if len(out) + size > MAX_BODY:
                self.close_connection = True
                raise OAuthError("invalid_request", "request body too large")
            out += self.rfile.read(size)
            self.rfile.readline(1024)

    def form(self):
        """The form parameters of a POST (RFC 6749 §3.2, appendix B)."""
        ctype = self.headers.get("Content-Type", "").split(";")[0].strip().lower()
        body = self.read_body()
        if ctype != "application/x-www-form-urlencoded":
            raise OAuthError(
                "invalid_request",
                "Content-Type must be application/x-www-form-urlencoded",
            )
        return parse_params(body.decode("utf-8", "replace"))

    def json_body(self):
        body = self.read_body()
        if not body.strip():
            return {}
        try:
            obj = json.loads(body)
        except ValueError:
            raise OAuthError("invalid_request", "body is not JSON")
        if not isinstance(obj, dict):
            raise OAuthError("invalid_request", "body is not a JSON object")
        return obj

    def client_auth(self, params, required=True):
        """RFC 6749 §2.3.1: HTTP Basic or client_id/client_secret in the body
        (not both). Returns the authenticated client_id."""
        args = self.state.args
        header = self.headers.get("Authorization")
        basic_id = basic_secret = None
        unauthorized = {"WWW-Authenticate": 'Basic realm="popbridge-test"'}
        if header is not None:
            scheme, _, value = header.partition(" ")
            if scheme.lower() == "basic":
                try:
                    decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
                except (ValueError, UnicodeDecodeError):
                    raise OAuthError("invalid_client", "malformed Basic credentials", 401, unauthorized)
                user, sep, password = decoded.partition(":")
                if not sep:
                    raise OAuthError("invalid_client", "malformed Basic credentials", 401, unauthorized)
                # §2.3.1: both parts are form-urlencoded before Basic.
                basic_id = urllib.parse.unquote_plus(user)
                basic_secret = urllib.parse.unquote_plus(password)
        body_id = params.get("client_id")
        body_secret = params.get("client_secret")
        if basic_id is not None and body_secret is not None:
            raise OAuthError("invalid_request", "more than one client authentication method")
        if basic_id is not None and body_id is not None and body_id != basic_id:
            raise OAuthError("invalid_client", "client_id differs from Basic user", 401, unauthorized)
        client_id = basic_id if basic_id is not None else body_id
        secret = basic_secret if basic_id is not None else body_secret
        if client_id is None:
            if not required:
                return None
            raise OAuthError("invalid_client", "client_id missing", 401, unauthorized)
        if client_id != args.client_id:
            raise OAuthError("invalid_client", "unknown client", 401, unauthorized)
        if args.client_secret is not None:
            if secret is None:
                raise OAuthError("invalid_client", "client authentication required", 401, unauthorized)
            if not secrets.compare_digest(secret.encode(), args.client_secret.encode()):
                raise OAuthError("invalid_client", "client authentication failed", 401, unauthorized)
        return client_id

    # --------------------------------------------------------------- routing
    def do_GET(self):  # noqa: N802
        try:
            path = self.urlpath()
            if path == "/authorize":
                self.authorize()
            elif path == "/test/stats":
                self.send_json(200, self.stats_snapshot())
            elif path == "/device":
                self.send_plain(200, "popbridge test verification page\n")
            else:
                self.send_plain(404, "not found\n")
        except OAuthError as e:
            self.send_error_json(e)

    def do_POST(self):  # noqa: N802
        routes = {
            "/device_authorization": self.device_authorization,
            "/token": self.token,
            "/introspect": self.introspect,
            "/revoke": self.revoke,
        }
        try:
            path = self.urlpath()
            if path in routes:
                routes[path]()
            elif path.startswith("/test/"):
                self.test_control(path[len("/test/"):])
            else:
                self.read_body()
                self.send_plain(404, "not found\n")
        except OAuthError as e:
            self.send_error_json(e)

    # -------------------------------------------------------------- throttle
    def check_throttle(self):
        st = self.state
        with st.lock:
            if st.throttle > 0:
                st.throttle -= 1
                st.stats["throttled"] += 1
                throttled = True
            else:
                throttled = False
        if throttled:
            raise OAuthError(
                "temporarily_unavailable",
                "throttled by the test control",
                429,
                {"Retry-After": "1"},
            )

    # ---------------------------------------------------------------- grants
    def issue(self, client_id, account, scope, family=None):
        """Issue an access token and a refresh token (caller holds the lock)."""
        st = self.state
        now = time.time()
        family = family or secrets.token_urlsafe(8)
        access = secrets.token_urlsafe(32)
        refresh = secrets.token_urlsafe(32)
        st.access[access] = {
            "account": account,
            "scope": scope,
            "client_id": client_id,
            "exp": int(now + st.args.access_ttl),
            "active": True,
            "family": family,
        }
        st.refresh[refresh] = {
            "account": account,
            "scope": scope,
            "client_id": client_id,
            "family": family,
            "state": "active",  # active | rotated | revoked
        }
        return {
            "access_token": access,
            "token_type": "Bearer",
            "expires_in": st.args.access_ttl,
            "refresh_token": refresh,
            "scope": scope,
        }

    def revoke_family(self, family):
        st = self.state
        for info in st.refresh.values():
            if info["family"] == family and info["state"] == "active":
                info["state"] = "revoked"
        for info in st.access.values():
            if info["family"] == family:
                info["active"] = False

    def device_authorization(self):
        params = self.form()
        self.check_throttle()
        client_id = self.client_auth(params)
        st = self.state
        scope = params.get("scope", st.args.default_scope)
        device_code = secrets.token_urlsafe(32)
        with st.lock:
            user_code = new_user_code()
            while normalise_user_code(user_code) in st.user_codes:
                user_code = new_user_code()
            st.devices[device_code] = {
                "client_id": client_id,
                "scope": scope,
                "user_code": user_code,
                "expires_at": time.time() + st.args.device_code_ttl,
                "interval": st.interval,
                "last_poll": None,
                "status": "pending",  # pending | approved | denied | used
                "account": None,
            }
            st.user_codes[normalise_user_code(user_code)] = device_code
            st.stats["device_authorizations"] += 1
            interval = st.interval
        base = "http://127.0.0.1:%d" % self.server.server_address[1]
        self.send_json(
            200,
            {
                "device_code": device_code,
                "user_code": user_code,
                "verification_uri": base + "/device",
                "verification_uri_complete": base + "/device?user_code=" + user_code,
                "expires_in": st.args.device_code_ttl,
                "interval": interval,
            },
        )

    def token(self):
        params = self.form()
        self.check_throttle()
        client_id = self.client_auth(params)
        grant = params.get("grant_type")
        if grant == DEVICE_GRANT:
            answer, note = self.grant_device(client_id, params)
        elif grant == "authorization_code":
            answer, note = self.grant_code(client_id, params)
        elif grant == "refresh_token":
            answer, note = self.grant_refresh(client_id, params)
        elif grant is None:
            raise OAuthError("invalid_request", "grant_type missing")
        else:
            raise OAuthError("unsupported_grant_type", "unsupported grant_type")
        self.send_json(200, answer, note=note)

    def grant_device(self, client_id, params):
        st = self.state
        device_code = require(params, "device_code")
        with st.lock:
            st.stats["device_polls"] += 1
            dev = st.devices.get(device_code)
            if dev is None or dev["client_id"] != client_id or dev["status"] == "used":
                raise OAuthError("invalid_grant", "unknown or used device_code")
            now = time.monotonic()
            if time.time() >= dev["expires_at"]:
                raise OAuthError("expired_token", "the device code has expired")
            if dev["status"] == "denied":
                raise OAuthError("access_denied", "the user denied the request")
            if dev["status"] == "pending":
                last = dev["last_poll"]
                dev["last_poll"] = now
                # RFC 8628 §3.5: polling faster than the interval gets
                # slow_down, and the interval grows by 5 s for this and all
                # later requests. 50 ms of slack for clock granularity.
                if last is not None and now - last < dev["interval"] - 0.05:
                    dev["interval"] += st.args.slow_down_increment
                    raise OAuthError("slow_down", "polling too fast; interval is now %d s" % dev["interval"])
                raise OAuthError("authorization_pending", "the user has not approved yet")
            dev["status"] = "used"
            st.stats["grants"]["device_code"] += 1
            return self.issue(client_id, dev["account"], dev["scope"]), "grant=device_code"

    def grant_code(self, client_id, params):
        st = self.state
        code = require(params, "code")
        redirect_uri = params.get("redirect_uri")
        verifier = params.get("code_verifier")
        with st.lock:
            info = st.codes.get(code)
            if info is None or info["client_id"] != client_id:
                raise OAuthError("invalid_grant", "unknown authorization code")
            if info["used"]:
                # RFC 6749 §4.1.2: a reused code revokes what it issued.
                if info["family"] is not None:
                    self.revoke_family(info["family"])
                raise OAuthError("invalid_grant", "authorization code already used")
            if time.time() >= info["expires_at"]:
                raise OAuthError("invalid_grant", "authorization code expired")
            # RFC 6749 §4.1.3: redirect_uri must be identical.
            if redirect_uri != info["redirect_uri"]:
                raise OAuthError("invalid_grant", "redirect_uri does not match")
            # RFC 7636 §4.6: BASE64URL(SHA256(code_verifier)) == challenge.
            if verifier is None:
                raise OAuthError("invalid_request", "code_verifier missing")
            if not VERIFIER_RE.match(verifier):
                raise OAuthError("invalid_request", "malformed code_verifier")
            if not secrets.compare_digest(b64url_sha256(verifier), info["challenge"]):
                raise OAuthError("invalid_grant", "PKCE verification failed")
            info["used"] = True
            answer = self.issue(client_id, info["account"], info["scope"])
            info["family"] = st.refresh[answer["refresh_token"]]["family"]
            st.stats["grants"]["authorization_code"] += 1
            return answer, "grant=authorization_code"

    def grant_refresh(self, client_id, params):
        st = self.state
        token = require(params, "refresh_token")
        with st.lock:
            info = st.refresh.get(token)
            if info is None or info["client_id"] != client_id:
                raise OAuthError("invalid_grant", "unknown refresh token")
            if info["state"] == "rotated":
                st.stats["refresh_reuse"] += 1
                if st.reuse_revokes_family:
                    self.revoke_family(info["family"])
                    raise OAuthError("invalid_grant", "refresh token reused; grant revoked")
                raise OAuthError("invalid_grant", "refresh token was rotated")
            if info["state"] != "active":
                raise OAuthError("invalid_grant", "refresh token revoked")
            scope = info["scope"]
            if "scope" in params:
                # RFC 6749 §6: a narrower scope may be asked for, not wider.
                asked = set(params["scope"].split())
                if not asked.issubset(set(scope.split())):
                    raise OAuthError("invalid_scope", "scope exceeds the original grant")
                scope = " ".join(sorted(asked))
            info["state"] = "rotated"
            st.stats["grants"]["refresh_token"] += 1
            return self.issue(client_id, info["account"], scope, info["family"]), "grant=refresh_token"

    def authorize(self):
        st = self.state
        query = urllib.parse.urlsplit(self.path).query
        params = parse_params(query)
        client_id = params.get("client_id")
        redirect_uri = params.get("redirect_uri")
        # RFC 6749 §4.1.2.1: with a bad client or redirect_uri, do not redirect.
        if client_id != st.args.client_id:
            self.send_plain(400, "unknown client_id\n")
            return
        if redirect_uri is None or not is_loopback_redirect(redirect_uri):
            self.send_plain(400, "redirect_uri must be an http loopback URI\n")
            return
        state_param = params.get("state")

        def redirect(extra, note):
            q = dict(extra)
            if state_param is not None:
                q["state"] = state_param
            sep = "&" if urllib.parse.urlsplit(redirect_uri).query else "?"
            self.send_redirect(redirect_uri + sep + urllib.parse.urlencode(q), note)

        if params.get("response_type") != "code":
            return redirect({"error": "unsupported_response_type"}, "error=unsupported_response_type")
        challenge = params.get("code_challenge")
        method = params.get("code_challenge_method")
        # RFC 7636 §4.4.1: this server requires PKCE, and only S256.
        if challenge is None or method != "S256" or not re.match(r"^[A-Za-z0-9\-_]{43}$", challenge):
            return redirect(
                {"error": "invalid_request", "error_description": "PKCE S256 code_challenge required"},
                "error=invalid_request",
            )
        with st.lock:
            account = params.get("login_hint") or st.default_account
            if account is None:
                pass
            else:
                code = secrets.token_urlsafe(24)
                st.codes[code] = {
                    "client_id": client_id,
                    "redirect_uri": redirect_uri,
                    "challenge": challenge,
                    "account": account,
                    "scope": params.get("scope", st.args.default_scope),
                    "expires_at": time.time() + AUTH_CODE_TTL,
                    "used": False,
                    "family": None,
                }
                st.stats["authorizations"] += 1
        if account is None:
            return redirect({"error": "access_denied", "error_description": "no user"}, "error=access_denied")
        redirect({"code": code}, "code issued")

    def introspect(self):
        st = self.state
        params = self.form()
        # RFC 7662 §2.1 wants the caller authenticated; Dovecot's oauth2
        # passdb (introspection_mode = post) sends no credentials unless
        # client_id is configured, so credentials are checked only if given.
        self.client_auth(params, required=False)
        token = require(params, "token")
        with st.lock:
            st.stats["introspections"] += 1
            if st.fail_introspection > 0:
                st.fail_introspection -= 1
                fail = True
            else:
                fail = False
            info = st.access.get(token)
            now = time.time()
            active = info is not None and info["active"] and now < info["exp"]
            if active:
                st.stats["introspections_active"] += 1
                answer = {
                    "active": True,
                    "username": info["account"],
                    "sub": info["account"],
                    "scope": info["scope"],
                    "client_id": info["client_id"],
                    "token_type": "Bearer",
                    "exp": info["exp"],
                }
            else:
                answer = {"active": False}
        if fail:
            self.send_plain(503, "introspection failure injected by the test control\n")
            return
        self.send_json(200, answer, note="active=%s" % str(active).lower())

    def revoke(self):
        st = self.state
        params = self.form()
        client_id = self.client_auth(params)
        token = require(params, "token")
        with st.lock:
            st.stats["revocations"] += 1
            # RFC 7009 §2.1: revoking a refresh token revokes its grant's
            # access tokens too; unknown tokens are not an error (§2.2).
            info = st.refresh.get(token)
            if info is not None and info["client_id"] == client_id:
                self.revoke_family(info["family"])
                info["state"] = "revoked"
            ainfo = st.access.get(token)
            if ainfo is not None and ainfo["client_id"] == client_id:
                ainfo["active"] = False
        self.send_json(200, {})

    # ------------------------------------------------------------ test control
    def test_control(self, name):
        st = self.state
        body = self.json_body()
        with st.lock:
            if name in ("approve", "deny"):
                code = normalise_user_code(str(body.get("user_code", "")))
                device_code = st.user_codes.get(code)
                dev = st.devices.get(device_code) if device_code else None
                if dev is None or dev["status"] != "pending":
                    result = (404, {"error": "no pending device authorization with that user_code"})
                elif name == "approve":
                    account = body.get("account")
                    if not isinstance(account, str) or not account:
                        result = (400, {"error": "account missing"})
                    else:
                        dev["status"] = "approved"
                        dev["account"] = account
                        result = (200, {"ok": True})
                else:
                    dev["status"] = "denied"
                    result = (200, {"ok": True})
            elif name == "expire_access":
                n = 0
                for info in st.access.values():
                    if info["active"]:
                        info["active"] = False
                        n += 1
                result = (200, {"expired": n})
            elif name == "expire_device_codes":
                n = 0
                for dev in st.devices.values():
                    if dev["status"] in ("pending", "approved"):
                        dev["expires_at"] = 0
                        n += 1
                result = (200, {"expired": n})
            elif name == "revoke_refresh":
                account = body.get("account")
                n = 0
                for info in st.refresh.values():
                    # Rotated tokens stay "rotated" (reuse detection still
                    # applies to them); only valid ones are counted.
                    if info["state"] == "active" and (account is None or info["account"] == account):
                        info["state"] = "revoked"
                        n += 1
                result = (200, {"revoked": n})
            elif name == "throttle":
                st.throttle = int(body.get("count", 1))
                result = (200, {"ok": True})
            elif name == "fail_introspection":
                st.fail_introspection = int(body.get("count", 1))
                result = (200, {"ok": True})
            elif name == "default_user":
                st.default_account = body.get("account")
                result = (200, {"ok": True})
            elif name == "config":
                if "reuse_revokes_family" in body:
                    st.reuse_revokes_family = bool(body["reuse_revokes_family"])
                if "interval" in body:
                    st.interval = int(body["interval"])
                result = (200, {"ok": True})
            else:
                result = (404, {"error": "unknown test control"})
        self.send_json(*result)

    def stats_snapshot(self):
        st = self.state
        with st.lock:
            snap = json.loads(json.dumps(st.stats))
            active = {}
            rotated = revoked = 0
            for info in st.refresh.values():
                if info["state"] == "active":
                    active[info["account"]] = active.get(info["account"], 0) + 1
                elif info["state"] == "rotated":
                    rotated += 1
                else:
                    revoked += 1
            now = time.time()
            snap["active_refresh_tokens"] = active
            snap["rotated_refresh_tokens"] = rotated
            snap["revoked_refresh_tokens"] = revoked
            snap["invalidated_refresh_tokens"] = rotated + revoked
            snap["active_access_tokens"] = sum(
                1 for a in st.access.values() if a["active"] and now < a["exp"]
            )
            snap["pending_device_codes"] = sum(
                1 for d in st.devices.values() if d["status"] == "pending"
            )
            snap["reuse_revokes_family"] = st.reuse_revokes_family
        return snap


def parse_params(text):
    """Form or query parameters; RFC 6749 §3.1/§3.2: no parameter twice."""
    try:
        pairs = urllib.parse.parse_qsl(text, keep_blank_values=True, strict_parsing=False)
    except ValueError:
        raise OAuthError("invalid_request", "malformed parameters")
    out = {}
    for k, v in pairs:
        if k in out:
            raise OAuthError("invalid_request", "parameter %s repeated" % k)
        # RFC 6749 §3.1: parameters sent without a value are omitted.
        if v != "":
            out[k] = v
    return out


def require(params, name):
    value = params.get(name)
    if value is None:
        raise OAuthError("invalid_request", "%s missing" % name)
    return value


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--access-ttl", type=int, default=3600, help="access token lifetime (s)")
    p.add_argument("--client-id", default="popbridge-test")
    p.add_argument("--client-secret", default=None)
    p.add_argument("--interval", type=int, default=1, help="device flow polling interval (s)")
    p.add_argument("--slow-down-increment", type=int, default=5, help="RFC 8628 §3.5: 5 s")
    p.add_argument("--device-code-ttl", type=int, default=600)
    p.add_argument("--default-scope", default="mail")
    p.add_argument("--reuse-revokes-family", action="store_true")
    args = p.parse_args()

    Handler.state = State(args)
    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    server.daemon_threads = True
    sys.stdout.write("READY %d\n" % server.server_address[1])
    sys.stdout.flush()
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
