//! The login throttle of several replicas: the semantics of
//! [`super::throttle`] (attempts in flight count, fixed windows that
//! refusals never extend, known addresses spared the per-user limit, counts
//! per upstream account and per IPv6 prefix), with the counts in Redis so
//! a guesser spread over every replica meets one budget.
//!
//! Keys (under `popbridge:cluster:`), all expiring by themselves:
//! - `fail:ip:<address>`, `fail:user:<account>`: failures in the window,
//!   `INCR`, with `PEXPIRE window` set by the failure that opened it;
//! - `flight:ip:<address>`, `flight:user:<account>`: logins between check
//!   and answer, decremented when they end; each reservation extends them
//!   by [`FLIGHT_TTL`], so counts of a replica that died go away;
//! - `known:<account>`: a sorted set of addresses that logged in to the
//!   account, scored by when each stops being known, and expiring with the
//!   newest.
//!
//! A check and its reservation are one Lua script (atomic in Redis), as
//! they are one mutex section in the per-process throttle; a login that
//! must wait for attempts in flight polls every [`WAIT_POLL`] (bounded by
//! the login deadline). The keys of one login span several hash slots:
//! this needs one Redis server (or a primary with replicas), not Redis
//! Cluster.
//!
//! When Redis fails, the login is throttled by this process's
//! [`LoginThrottle`] instead (logged and counted, see [`super::cluster`]).

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use super::cluster::{key, Cluster};
use super::throttle::{
    self, AccountKey, LoginThrottle, ThrottleConfig, Throttled, KNOWN_ADDRESS_TTL,
};

/// How long a login's place in the in-flight counts outlives its last
/// reservation: longer than any login takes (the login deadline), so only
/// the places of a replica that died expire this way.
pub const FLIGHT_TTL: Duration = Duration::from_secs(120);

/// How often a login waiting for attempts in flight asks again.
pub const WAIT_POLL: Duration = Duration::from_millis(100);

/// The largest multiple of `failure_delay` applied to one answer (as in the
/// per-process throttle).
const MAX_DELAY_STEPS: u32 = 4;

/// KEYS: fail ip, fail user, flight ip, flight user, known. ARGV: per-ip
/// limit, per-user limit, address, flight TTL (ms). Returns `ip` or `user`
/// (refused), `wait`, or `go` (reserved).
const BEGIN_SCRIPT: &str = r#"
local max_ip = tonumber(ARGV[1])
local max_user = tonumber(ARGV[2])
local ipf = tonumber(redis.call('GET', KEYS[1]) or '0')
if ipf >= max_ip then return 'ip' end
local wait = ipf + tonumber(redis.call('GET', KEYS[3]) or '0') >= max_ip
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local known = redis.call('ZSCORE', KEYS[5], ARGV[3])
if not (known and tonumber(known) > now) then
  local uf = tonumber(redis.call('GET', KEYS[2]) or '0')
  if uf >= max_user then return 'user' end
  if uf + tonumber(redis.call('GET', KEYS[4]) or '0') >= max_user then wait = true end
end
if wait then return 'wait' end
redis.call('INCR', KEYS[3])
redis.call('PEXPIRE', KEYS[3], ARGV[4])
redis.call('INCR', KEYS[4])
redis.call('PEXPIRE', KEYS[4], ARGV[4])
return 'go'
"#;

/// KEYS: flight ip, flight user, fail ip, fail user, known. ARGV: failed
/// (0/1), window (ms), address, known TTL (ms), succeeded (0/1). Returns
/// the address's failures in its window (0 unless failed).
const SETTLE_SCRIPT: &str = r#"
for i = 1, 2 do
  local n = tonumber(redis.call('GET', KEYS[i]) or '0')
  if n > 1 then redis.call('DECR', KEYS[i]) elseif n == 1 then redis.call('DEL', KEYS[i]) end
end
local ipf = 0
if ARGV[1] == '1' then
  ipf = redis.call('INCR', KEYS[3])
  if ipf == 1 then redis.call('PEXPIRE', KEYS[3], ARGV[2]) end
  if redis.call('INCR', KEYS[4]) == 1 then redis.call('PEXPIRE', KEYS[4], ARGV[2]) end
end
if ARGV[5] == '1' then
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  redis.call('ZADD', KEYS[5], now + tonumber(ARGV[4]), ARGV[3])
  redis.call('ZREMRANGEBYSCORE', KEYS[5], '-inf', now)
  redis.call('PEXPIRE', KEYS[5], ARGV[4])
end
return ipf
"#;

/// The login throttle: per process, or shared through Redis.
#[derive(Debug, Clone)]
pub enum Throttle {
    /// One replica (no `[cluster]`).
    Local(Arc<LoginThrottle>),
    /// Several replicas.
    Shared(Arc<SharedThrottle>),
}

/// The throttle in Redis, with the per-process one for outages.
#[derive(Debug)]
pub struct SharedThrottle {
    /// Where the counts live.
    cluster: Arc<Cluster>,
    /// The settings, and the counts used while Redis fails.
    local: Arc<LoginThrottle>,
}

/// One login attempt between the check and the answer (see
/// [`throttle::Attempt`]).
#[derive(Debug)]
pub enum Attempt {
    Local(throttle::Attempt),
    Shared(SharedAttempt),
}

/// An attempt counted in Redis; a drop without an outcome releases its
/// place (in the background).
#[derive(Debug)]
pub struct SharedAttempt {
    throttle: Arc<SharedThrottle>,
    /// The address as counted (IPv6 by prefix).
    ip: IpAddr,
    account: AccountKey,
    /// An outcome was recorded: drop has nothing to release.
    done: bool,
}

impl Throttle {
    /// The per-process throttle.
    pub fn local(config: ThrottleConfig) -> Self {
        Self::Local(Arc::new(LoginThrottle::new(config)))
    }

    /// The throttle shared through `cluster` (falling back to a
    /// per-process one with the same settings).
    pub fn shared(config: ThrottleConfig, cluster: Arc<Cluster>) -> Self {
        Self::Shared(Arc::new(SharedThrottle {
            cluster,
            local: Arc::new(LoginThrottle::new(config)),
        }))
    }

    /// The settings it was built with.
    pub fn config(&self) -> &ThrottleConfig {
        match self {
            Self::Local(t) => t.config(),
            Self::Shared(t) => t.local.config(),
        }
    }

    /// The cluster state, for a shared throttle.
    pub fn cluster(&self) -> Option<&Arc<Cluster>> {
        match self {
            Self::Local(_) => None,
            Self::Shared(t) => Some(&t.cluster),
        }
    }

    /// The key `ip` is counted under (see [`throttle::address_key`]).
    pub fn address_key(&self, ip: IpAddr) -> IpAddr {
        match self {
            Self::Local(t) => t.address_key(ip),
            Self::Shared(t) => t.local.address_key(ip),
        }
    }

    /// Whether a login from `ip` for `account` may reach the upstream now
    /// (waiting while attempts in flight could still reach a limit).
    pub async fn begin(&self, ip: IpAddr, account: &AccountKey) -> Result<Attempt, Throttled> {
        match self {
            Self::Local(t) => t.begin(ip, account).await.map(Attempt::Local),
            Self::Shared(t) => t.begin(ip, account).await,
        }
    }

    /// Whether `ip` has reached its failure limit (any login from it would
    /// be refused, whatever the account).
    pub async fn address_refused(&self, ip: IpAddr) -> bool {
        match self {
            Self::Local(t) => t.address_refused(ip),
            Self::Shared(t) => t.address_refused(ip).await,
        }
    }

    /// How long to wait before answering a login the throttle refused.
    pub async fn refused_delay(&self, ip: IpAddr) -> Duration {
        match self {
            Self::Local(t) => t.refused_delay(ip),
            Self::Shared(t) => t.refused_delay(ip).await,
        }
    }
}

fn addr_id(ip: IpAddr) -> String {
    ip.to_string()
}

fn keys(ip: IpAddr, account: &AccountKey) -> [String; 5] {
    let (a, u) = (addr_id(ip), account.id());
    [
        key("fail:ip", &a),
        key("fail:user", &u),
        key("flight:ip", &a),
        key("flight:user", &u),
        key("known", &u),
    ]
}

impl SharedThrottle {
    fn delay(&self, failures: u32) -> Duration {
        self.local.config().failure_delay * failures.clamp(1, MAX_DELAY_STEPS)
    }

    async fn begin(
        self: &Arc<Self>,
        ip: IpAddr,
        account: &AccountKey,
    ) -> Result<Attempt, Throttled> {
        let addr = self.local.address_key(ip);
        let [fail_ip, fail_user, flight_ip, flight_user, known] = keys(addr, account);
        let c = self.local.config();
        let (max_ip, max_user) = (
            c.max_failures_per_ip.to_string(),
            c.max_failures_per_user.to_string(),
        );
        let (addr_s, ttl) = (addr_id(addr), FLIGHT_TTL.as_millis().to_string());
        let script = redis::Script::new(BEGIN_SCRIPT);
        loop {
            let r = self
                .cluster
                .redis
                .script::<String>(
                    &script,
                    &[&fail_ip, &fail_user, &flight_ip, &flight_user, &known],
                    &[&max_ip, &max_user, &addr_s, &ttl],
                )
                .await;
            match r.as_deref() {
                Ok("go") => {
                    return Ok(Attempt::Shared(SharedAttempt {
                        throttle: self.clone(),
                        ip: addr,
                        account: account.clone(),
                        done: false,
                    }))
                }
                Ok("ip") => return Err(Throttled::Address),
                Ok("user") => return Err(Throttled::User),
                Ok("wait") => tokio::time::sleep(WAIT_POLL).await,
                Ok(other) => {
                    let e = self
                        .cluster
                        .redis
                        .error(format!("unexpected reply {other:?}"));
                    self.cluster
                        .outage("throttle_begin", &e, "throttling in this process only");
                    return self.local.begin(ip, account).await.map(Attempt::Local);
                }
                Err(e) => {
                    self.cluster
                        .outage("throttle_begin", e, "throttling in this process only");
                    return self.local.begin(ip, account).await.map(Attempt::Local);
                }
            }
        }
    }

    async fn address_refused(&self, ip: IpAddr) -> bool {
        let addr = self.local.address_key(ip);
        let mut get = redis::cmd("GET");
        get.arg(key("fail:ip", &addr_id(addr)));
        match self.cluster.redis.query::<Option<u32>>(&get).await {
            Ok(n) => n.unwrap_or(0) >= self.local.config().max_failures_per_ip,
            Err(_) => self.local.address_refused(ip),
        }
    }

    async fn refused_delay(&self, ip: IpAddr) -> Duration {
        let addr = self.local.address_key(ip);
        let mut get = redis::cmd("GET");
        get.arg(key("fail:ip", &addr_id(addr)));
        match self.cluster.redis.query::<Option<u32>>(&get).await {
            Ok(n) => self.delay(n.unwrap_or(0)),
            Err(_) => self.local.refused_delay(ip),
        }
    }

    /// Ends an attempt in Redis; returns the address's failures.
    async fn settle(&self, ip: IpAddr, account: &AccountKey, failed: bool, succeeded: bool) -> u32 {
        let [fail_ip, fail_user, flight_ip, flight_user, known] = keys(ip, account);
        let c = self.local.config();
        let r = self
            .cluster
            .redis
            .script::<u32>(
                &redis::Script::new(SETTLE_SCRIPT),
                &[&flight_ip, &flight_user, &fail_ip, &fail_user, &known],
                &[
                    if failed { "1" } else { "0" },
                    &c.window.as_millis().to_string(),
                    &addr_id(ip),
                    &KNOWN_ADDRESS_TTL.as_millis().to_string(),
                    if succeeded { "1" } else { "0" },
                ],
            )
            .await;
        match r {
            Ok(n) => n,
            Err(e) => {
                // Places in flight expire after FLIGHT_TTL.
                self.cluster.outage(
                    "throttle_settle",
                    &e,
                    "this login's outcome is not counted across replicas",
                );
                0
            }
        }
    }
}

impl Attempt {
    /// A failed login (wrong credentials): counted; returns how long to
    /// wait before answering.
    pub async fn failed(self) -> Duration {
        match self {
            Self::Local(a) => a.failed(),
            Self::Shared(mut a) => {
                a.done = true;
                let n = a.throttle.settle(a.ip, &a.account, true, false).await;
                a.throttle.delay(n)
            }
        }
    }

    /// The credentials were right: the address becomes known to the account.
    pub async fn succeeded(self) {
        match self {
            Self::Local(a) => a.succeeded(),
            Self::Shared(mut a) => {
                a.done = true;
                a.throttle.settle(a.ip, &a.account, false, true).await;
            }
        }
    }
}

impl Drop for SharedAttempt {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        // A login that ended otherwise: its place is released, nothing is
        // counted.
        let (t, ip, account) = (self.throttle.clone(), self.ip, self.account.clone());
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                t.settle(ip, &account, false, false).await;
            });
        }
    }
}
