//! The Redis backend, for several popbridge replicas sharing tokens.
//!
//! Keys (all under `popbridge:oauth:`):
//! - `meta`: `{"format":…,"version":1,"key_id":…}`, set once; a replica with
//!   another key refuses to start.
//! - `accounts`: a hash, account name → JSON [`StoredAccount`].
//! - `devices`: a hash, login → JSON [`StoredDevice`] (sealed; checked by
//!   [`super::store::TokenStore`], not here).
//! - `lock:<account>`: the refresh lock, `SET NX PX` with a random token,
//!   released by a compare-and-delete script so a holder whose lock expired
//!   never deletes the next holder's.
//!
//! Account writes go through a Lua script that compares the stored
//! version first (Redis runs a script atomically), so a replica that lost
//! a refresh race can never overwrite a newer refresh token.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};

use redis::aio::MultiplexedConnection;

use crate::cluster::RedisConn;
use crate::config::cluster::RedisEndpoint;

use super::store::{
    RefreshLock, StoreError, StoredAccount, StoredDevice, FILE_VERSION, LOCK_POLL,
    REFRESH_LOCK_TTL, REFRESH_LOCK_WAIT,
};

/// Namespace of every key.
pub const PREFIX: &str = "popbridge:oauth:";

/// KEYS[1] accounts hash; ARGV: account, expected version, new JSON.
const CAS_SCRIPT: &str = r#"
local cur = redis.call('HGET', KEYS[1], ARGV[1])
local v = 0
if cur then v = tonumber(cjson.decode(cur)['version']) or 0 end
if v ~= tonumber(ARGV[2]) then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
return 1
"#;

/// KEYS[1] devices hash; ARGV: login, the record as read, the new record.
const REPLACE_SCRIPT: &str = r#"
if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
return 1
"#;

/// KEYS[1] lock key; ARGV[1] our token.
const UNLOCK_SCRIPT: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"#;

/// The token store's keys on a Redis server (through the shared
/// connection code, [`crate::cluster`]).
pub struct RedisStore {
    redis: RedisConn,
    /// Id of the configured key, checked against `meta` on each new
    /// connection.
    key_id: String,
    /// The connection generation whose key id was checked last.
    checked: AtomicU64,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("url", &self.redis.url())
            .finish()
    }
}

fn key(name: &str) -> String {
    format!("{PREFIX}{name}")
}

impl RedisStore {
    /// Prepares a connection (reads the password and CA files); nothing is
    /// contacted until first use.
    pub fn new(endpoint: &RedisEndpoint, key_id: &str) -> Result<Self, StoreError> {
        let redis = RedisConn::new(endpoint).map_err(|e| StoreError::Redis(e.to_string()))?;
        Ok(Self {
            redis,
            key_id: key_id.to_string(),
            checked: AtomicU64::new(0),
        })
    }

    /// A blocking check for start-up: a store written with another key is
    /// an error; an unreachable server is reported as `Ok(Some(reason))`
    /// so popbridge can start and retry at first use. Runs on a thread of
    /// its own (callers may be inside a runtime).
    pub fn check_blocking(&self) -> Result<Option<String>, StoreError> {
        std::thread::scope(|s| {
            s.spawn(|| {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| StoreError::Io(e.to_string()))?;
                rt.block_on(async {
                    let r = match self.redis.get().await {
                        Err(e) => Ok(Some(e.to_string())),
                        Ok(_) => self.check().await.map(|()| None),
                    };
                    // Its reader task ends with this runtime.
                    self.redis.disconnect().await;
                    r
                })
            })
            .join()
            .unwrap_or_else(|_| Err(StoreError::Io("start-up check panicked".into())))
        })
    }

    fn meta_json(&self) -> String {
        serde_json::json!({
            "format": "popbridge-oauth-redis",
            "version": FILE_VERSION,
            "key_id": self.key_id,
        })
        .to_string()
    }

    fn compare_meta(&self, stored: Option<String>) -> Result<(), StoreError> {
        let key_id = self.key_id.as_str();
        let stored = stored.ok_or_else(|| self.err("meta key vanished"))?;
        let v: serde_json::Value = serde_json::from_str(&stored).map_err(|_| {
            StoreError::Corrupt(format!(
                "redis {}: {PREFIX}meta is corrupt",
                self.redis.url()
            ))
        })?;
        match v.get("key_id").and_then(|k| k.as_str()) {
            Some(found) if found == key_id => Ok(()),
            Some(found) => Err(super::crypto::OpenError::WrongKey {
                found: found.to_string(),
                expected: key_id.to_string(),
            }
            .into()),
            None => Err(StoreError::Corrupt(format!(
                "redis {}: {PREFIX}meta has no key_id",
                self.redis.url()
            ))),
        }
    }

    /// Connects now (and checks the key id), for commands that should fail
    /// early.
    pub async fn check(&self) -> Result<(), StoreError> {
        self.checked_conn().await
    }

    fn err(&self, e: impl std::fmt::Display) -> StoreError {
        StoreError::Redis(self.redis.error(e).to_string())
    }

    /// Makes sure the current connection's store has our key id (once per
    /// connection).
    async fn checked_conn(&self) -> Result<(), StoreError> {
        let (mut c, generation) = self
            .redis
            .get()
            .await
            .map_err(|e| StoreError::Redis(e.to_string()))?;
        if self.checked.load(Ordering::Relaxed) == generation {
            return Ok(());
        }
        match tokio::time::timeout(self.redis.timeout(), self.check_key_id(&mut c)).await {
            Ok(Ok(())) => {
                self.checked.store(generation, Ordering::Relaxed);
                Ok(())
            }
            Ok(Err(e)) => Err(e),
            Err(_) => {
                self.redis.reset(generation).await;
                Err(self.err("key check timed out"))
            }
        }
    }

    /// Runs one command with a timeout; a failed connection is dropped so
    /// the next call reconnects.
    async fn query<T: redis::FromRedisValue>(&self, cmd: redis::Cmd) -> Result<T, StoreError> {
        self.checked_conn().await?;
        self.redis
            .query(&cmd)
            .await
            .map_err(|e| StoreError::Redis(e.to_string()))
    }

    async fn script<T: redis::FromRedisValue>(
        &self,
        src: &str,
        keys: &[&str],
        args: &[&str],
    ) -> Result<T, StoreError> {
        self.checked_conn().await?;
        self.redis
            .script(&redis::Script::new(src), keys, args)
            .await
            .map_err(|e| StoreError::Redis(e.to_string()))
    }

    /// Records the key id on first use; refuses another key afterwards.
    async fn check_key_id(&self, c: &mut MultiplexedConnection) -> Result<(), StoreError> {
        let _: Option<String> = redis::cmd("SET")
            .arg(key("meta"))
            .arg(self.meta_json())
            .arg("NX")
            .query_async(c)
            .await
            .map_err(|e| self.err(e))?;
        let stored: Option<String> = redis::cmd("GET")
            .arg(key("meta"))
            .query_async(c)
            .await
            .map_err(|e| self.err(e))?;
        self.compare_meta(stored)
    }

    fn decode<T: serde::de::DeserializeOwned>(
        &self,
        what: &str,
        json: &str,
    ) -> Result<T, StoreError> {
        serde_json::from_str(json).map_err(|_| {
            StoreError::Corrupt(format!(
                "redis {}: the record for {what} is corrupt",
                self.redis.url()
            ))
        })
    }

    pub async fn get_account(&self, account: &str) -> Result<Option<StoredAccount>, StoreError> {
        let mut c = redis::cmd("HGET");
        c.arg(key("accounts")).arg(account);
        let v: Option<String> = self.query(c).await?;
        v.map(|j| self.decode(account, &j)).transpose()
    }

    pub async fn all_accounts(&self) -> Result<BTreeMap<String, StoredAccount>, StoreError> {
        let mut c = redis::cmd("HGETALL");
        c.arg(key("accounts"));
        let v: BTreeMap<String, String> = self.query(c).await?;
        v.into_iter()
            .map(|(a, j)| Ok((a.clone(), self.decode(&a, &j)?)))
            .collect()
    }

    pub async fn cas_account(
        &self,
        account: &str,
        expected: u64,
        stored: &StoredAccount,
    ) -> Result<bool, StoreError> {
        let json = serde_json::to_string(stored).map_err(|e| StoreError::Io(e.to_string()))?;
        let done: i64 = self
            .script(
                CAS_SCRIPT,
                &[&key("accounts")],
                &[account, &expected.to_string(), &json],
            )
            .await?;
        Ok(done == 1)
    }

    pub async fn remove_account(&self, account: &str) -> Result<bool, StoreError> {
        let mut c = redis::cmd("HDEL");
        c.arg(key("accounts")).arg(account);
        let n: i64 = self.query(c).await?;
        Ok(n > 0)
    }

    /// `SET lock:<account> <random> NX PX <ttl>`, polled until
    /// [`REFRESH_LOCK_WAIT`].
    pub async fn lock(&self, account: &str) -> Result<RefreshLock, StoreError> {
        let mut rnd = [0u8; 16];
        getrandom::getrandom(&mut rnd).map_err(|e| StoreError::Io(e.to_string()))?;
        let token = hex::encode(rnd);
        let lock_key = key(&format!("lock:{account}"));
        let deadline = tokio::time::Instant::now() + REFRESH_LOCK_WAIT;
        loop {
            let mut c = redis::cmd("SET");
            c.arg(&lock_key)
                .arg(&token)
                .arg("NX")
                .arg("PX")
                .arg(REFRESH_LOCK_TTL.as_millis() as u64);
            let got: Option<String> = self.query(c).await?;
            if got.is_some() {
                return Ok(RefreshLock::Redis {
                    key: lock_key,
                    token,
                });
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(StoreError::LockTimeout(account.to_string()));
            }
            tokio::time::sleep(LOCK_POLL).await;
        }
    }

    pub async fn unlock(&self, lock_key: &str, token: &str) {
        let r: Result<i64, _> = self.script(UNLOCK_SCRIPT, &[lock_key], &[token]).await;
        if let Err(e) = r {
            // It expires by itself after REFRESH_LOCK_TTL.
            tracing::warn!(error = %e, "could not release a refresh lock");
        }
    }

    /// A device record as stored; one that does not decode is refused
    /// like a forged one (it names only its login).
    pub async fn get_device(&self, login: &str) -> Result<Option<StoredDevice>, StoreError> {
        let mut c = redis::cmd("HGET");
        c.arg(key("devices")).arg(login);
        let v: Option<String> = self.query(c).await?;
        Ok(v.map(|j| decode_device(login, &j)))
    }

    pub async fn all_devices(&self) -> Result<Vec<(String, StoredDevice)>, StoreError> {
        let mut c = redis::cmd("HGETALL");
        c.arg(key("devices"));
        let v: BTreeMap<String, String> = self.query(c).await?;
        Ok(v.into_iter()
            .map(|(l, j)| {
                let d = decode_device(&l, &j);
                (l, d)
            })
            .collect())
    }

    pub async fn add_device(&self, d: &StoredDevice) -> Result<bool, StoreError> {
        let json = serde_json::to_string(d).map_err(|e| StoreError::Io(e.to_string()))?;
        let mut c = redis::cmd("HSETNX");
        c.arg(key("devices")).arg(&d.login).arg(json);
        let n: i64 = self.query(c).await?;
        Ok(n == 1)
    }

    /// Replaces `old` (as read) by `new` unless it changed meanwhile.
    pub async fn replace_device(
        &self,
        old: &StoredDevice,
        new: &StoredDevice,
    ) -> Result<bool, StoreError> {
        // The script compares raw text: fetch it, check that it still
        // decodes to `old`, and let the script replace exactly that text.
        let mut c = redis::cmd("HGET");
        c.arg(key("devices")).arg(&old.login);
        let raw: Option<String> = self.query(c).await?;
        let Some(raw) = raw else { return Ok(false) };
        if decode_device(&old.login, &raw) != *old {
            return Ok(false);
        }
        let json = serde_json::to_string(new).map_err(|e| StoreError::Io(e.to_string()))?;
        let done: i64 = self
            .script(
                REPLACE_SCRIPT,
                &[&key("devices")],
                &[&old.login, &raw, &json],
            )
            .await?;
        Ok(done == 1)
    }

    pub async fn remove_device(&self, login: &str) -> Result<bool, StoreError> {
        let mut c = redis::cmd("HDEL");
        c.arg(key("devices")).arg(login);
        let n: i64 = self.query(c).await?;
        Ok(n > 0)
    }
}

/// A device record's JSON, or (when it is not one) a record that names
/// only its login and is refused as tampered.
fn decode_device(login: &str, json: &str) -> StoredDevice {
    serde_json::from_str(json).unwrap_or_else(|_| StoredDevice::undecodable(login))
}
