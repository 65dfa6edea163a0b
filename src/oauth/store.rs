//! The token and device store: records, the encrypted form, and the two
//! backends (files under `<data.dir>/oauth/`, or Redis for several
//! replicas; see [`super::redis_store`]).
//!
//! Account records keep their secrets (refresh token, and the current
//! access token so a second replica can reuse it instead of refreshing
//! again) sealed with the store key; the rest (provider, status, times,
//! version) is clear so `oauth list` needs no decryption. Device records
//! keep their argon2id PHC hash sealed with the same key, with associated
//! data that binds it to every clear field (login, account, networks,
//! creation time): whoever can write to the store but lacks the key can
//! neither add a device nor change one (its account or networks), and a
//! record that fails the check is refused, logged and counted. Records
//! written before devices were sealed (the hash in clear) are refused the
//! same way until an operator seals them (`popbridge device seal`).
//!
//! Every update of an account is a compare-and-set on its `version`, so a
//! writer that read an older record can never overwrite a newer refresh
//! token.
//!
//! # File format (version 1)
//! `tokens.json`:
//! ```text
//! { "format": "popbridge-oauth-tokens", "version": 1, "key_id": "<16 hex>",
//!   "accounts": { "<account>": {
//!       "provider": "google", "scopes": ["https://mail.google.com/"],
//!       "status": {"state": "active"}
//!               | {"state": "needs_reenrolment", "reason": "...", "since": <unix s>},
//!       "created": <unix s>, "updated": <unix s>, "version": <n>,
//!       "backoff_reset": <unix ms>,
//!       "sealed": {"key_id": "<16 hex>", "nonce": "<base64, 24 bytes>",
//!                  "ciphertext": "<base64>"} } } }
//! ```
//! The sealed plaintext is JSON `{"refresh_token", "access_token",
//! "access_expires_at", "access_issued_at_ms"}`; the associated data is
//! `popbridge-oauth-v1 \0 <key_id> \0 <account>` ([`super::crypto`]).
//! `devices.json`: `{"format": "popbridge-oauth-devices", "version": 1,
//! "devices": {"<login>": {"login", "account", "allow": ["10.0.0.0/8"],
//! "created", "sealed": {"key_id", "nonce", "ciphertext"}}}}`: the sealed
//! plaintext is the argon2id PHC hash, the associated data
//! `popbridge-device-v1 \0 <key_id> \0` and then login, account, the
//! networks (comma-separated) and `created` (decimal), each prefixed by its
//! length as 8 bytes big-endian. (Records of earlier versions have
//! `"hash"` in clear and no `"sealed"`.) Redis holds the same JSON records
//! in the hashes `popbridge:oauth:accounts` and `popbridge:oauth:devices`
//! ([`super::redis_store`]).

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::crypto::{OpenError, Sealed, StoreKey};
use super::redis_store::RedisStore;
use crate::config::cluster::RedisEndpoint;

/// Name of the token file in the store directory.
pub const TOKENS_FILE: &str = "tokens.json";
/// Name of the device file in the store directory.
pub const DEVICES_FILE: &str = "devices.json";
/// Suffix of the previous generation kept beside each file.
pub const BACKUP_SUFFIX: &str = ".bak";
/// `format` field of the token file.
const TOKENS_FORMAT: &str = "popbridge-oauth-tokens";
/// `format` field of the device file.
const DEVICES_FORMAT: &str = "popbridge-oauth-devices";
/// Current version of both file formats.
pub const FILE_VERSION: u32 = 1;
/// A store file larger than this is refused rather than read into memory
/// (thousands of accounts fit in a few MiB).
const MAX_FILE_BYTES: u64 = 64 * 1024 * 1024;
/// How long a refresh lock is held at most: longer than one token request
/// ([`super::provider::HTTP_TIMEOUT`]) so a live holder never loses it, short
/// enough that a crashed holder blocks the account only briefly.
pub const REFRESH_LOCK_TTL: Duration = Duration::from_secs(45);
/// How long to wait for another process's refresh before giving up.
pub const REFRESH_LOCK_WAIT: Duration = Duration::from_secs(50);
/// Poll interval while waiting for a refresh lock.
pub const LOCK_POLL: Duration = Duration::from_millis(100);

pub use crate::clock::{now_unix, now_unix_ms};

/// Store failures. Messages name files and accounts, never secrets.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Key(#[from] OpenError),
    #[error("{0}")]
    Corrupt(String),
    #[error("{0}")]
    Io(String),
    #[error("{0}")]
    Redis(String),
    #[error("another process is refreshing the token for {0}; gave up waiting")]
    LockTimeout(String),
    #[error("{}", untrusted_device_message(login, problem))]
    UntrustedDevice {
        login: String,
        problem: DeviceProblem,
    },
}

fn untrusted_device_message(login: &str, problem: &DeviceProblem) -> String {
    match problem {
        DeviceProblem::Unsealed => format!(
            "device record {login:?} is not sealed with the store key (written before popbridge sealed device records, or by someone else): refused. If it is yours, check it with `popbridge device list` and seal it with `popbridge device seal {login}`; otherwise remove it"
        ),
        DeviceProblem::Tampered(why) => format!(
            "device record {login:?} failed its integrity check ({why}): refused. Remove it (`popbridge device remove {login}`) and add the device again"
        ),
    }
}

/// Whether an account's refresh token works.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum AccountStatus {
    Active,
    /// The provider refused the refresh token (`invalid_grant`); an
    /// operator must run `popbridge oauth add <account>` again.
    NeedsReenrolment {
        reason: String,
        since: u64,
    },
}

/// The secrets of an account (sealed at rest). `Debug` hides them.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenSecrets {
    pub refresh_token: String,
    /// The latest access token, shared between replicas.
    #[serde(default)]
    pub access_token: Option<String>,
    /// The provider's expiry of `access_token`, Unix seconds.
    #[serde(default)]
    pub access_expires_at: Option<u64>,
    /// When `access_token` was obtained, Unix milliseconds.
    #[serde(default)]
    pub access_issued_at_ms: Option<u64>,
}

impl std::fmt::Debug for TokenSecrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenSecrets(***)")
    }
}

/// One enrolled account, decrypted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccountRecord {
    pub account: String,
    pub meta: AccountMeta,
    pub secrets: TokenSecrets,
}

/// The clear part of an account record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccountMeta {
    /// The `[[oauth.providers]]` name it was enrolled with.
    pub provider: String,
    /// Scopes granted (or requested when the provider did not say).
    pub scopes: Vec<String>,
    pub status: AccountStatus,
    /// Unix seconds.
    pub created: u64,
    pub updated: u64,
    /// Incremented by every write; the compare-and-set key.
    pub version: u64,
    /// Set (to the time in Unix milliseconds) by every enrolment and every
    /// `oauth test` whose IMAP login succeeded. A process that backs the
    /// account off remembers the value it last read, and lifts its
    /// back-off as soon as the stored value differs: the operator's fix
    /// takes effect at once on every replica sharing the store. 0 in
    /// records written before it existed.
    #[serde(default)]
    pub backoff_reset: u64,
}

/// An account record as stored: clear metadata and sealed secrets.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredAccount {
    #[serde(flatten)]
    pub meta: AccountMeta,
    pub sealed: Sealed,
}

/// One device login.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceRecord {
    /// The POP3 user name the device logs in with.
    pub login: String,
    /// argon2id PHC string.
    pub hash: String,
    /// The upstream account it reads.
    pub account: String,
    /// Networks it may log in from; empty: anywhere.
    #[serde(default)]
    pub allow: Vec<ipnet::IpNet>,
    /// Unix seconds.
    pub created: u64,
}

/// A device record as stored: the clear fields, and the hash sealed with
/// the store key and bound to them ([`super::crypto::StoreKey::seal_device`]).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredDevice {
    pub login: String,
    pub account: String,
    #[serde(default)]
    pub allow: Vec<ipnet::IpNet>,
    pub created: u64,
    /// The argon2id hash, sealed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sealed: Option<Sealed>,
    /// Only in records written before device records were sealed: the
    /// hash in clear. Refused until `popbridge device seal` seals it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash: Option<String>,
    /// Set (never stored) for a stored value that is not a device record
    /// at all: refused like a forged one.
    #[serde(skip)]
    pub(crate) undecodable: bool,
}

impl std::fmt::Debug for StoredDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoredDevice")
            .field("login", &self.login)
            .field("account", &self.account)
            .field("allow", &self.allow)
            .field("created", &self.created)
            .field("sealed", &self.sealed.is_some())
            .finish_non_exhaustive()
    }
}

impl StoredDevice {
    /// What the seal binds: every clear field, in a fixed order.
    fn bound(&self) -> [Vec<u8>; 4] {
        let allow: Vec<String> = self.allow.iter().map(ToString::to_string).collect();
        [
            self.login.clone().into_bytes(),
            self.account.clone().into_bytes(),
            allow.join(",").into_bytes(),
            self.created.to_string().into_bytes(),
        ]
    }

    /// A record that does not even decode, under the name it is stored as
    /// (listed as refused).
    pub(crate) fn undecodable(login: &str) -> StoredDevice {
        StoredDevice {
            login: login.to_string(),
            account: String::new(),
            allow: Vec::new(),
            created: 0,
            sealed: None,
            hash: None,
            undecodable: true,
        }
    }
}

/// One entry of [`TokenStore::devices`].
#[derive(Debug, Clone)]
pub struct DeviceListing {
    /// The login the record is stored under (what a device sends).
    pub login: String,
    /// The record's clear fields (its own `login` may differ when it was
    /// copied: then `check` says so).
    pub record: StoredDevice,
    /// `Err`: refused at login, and why.
    pub check: Result<(), DeviceProblem>,
}

/// Why a stored device record is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceProblem {
    /// No seal: written by a popbridge from before device records were
    /// sealed, or by someone without the key.
    Unsealed,
    /// The seal does not match the record (a field changed, the record
    /// copied under another name, another key, or not a device record).
    Tampered(String),
}

impl DeviceProblem {
    /// The `kind` label of `popbridge_oauth_device_records_refused_total`.
    pub fn kind(&self) -> &'static str {
        match self {
            DeviceProblem::Unsealed => "unsealed",
            DeviceProblem::Tampered(_) => "tampered",
        }
    }
}

impl std::fmt::Debug for DeviceRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceRecord")
            .field("login", &self.login)
            .field("account", &self.account)
            .field("allow", &self.allow)
            .field("created", &self.created)
            .finish_non_exhaustive()
    }
}

/// The store: a backend and the key that seals secrets.
#[derive(Debug)]
pub struct TokenStore {
    backend: Backend,
    key: StoreKey,
}

#[derive(Debug)]
enum Backend {
    File(FileStore),
    Redis(Box<RedisStore>),
}

/// A held refresh lock; release it with [`TokenStore::unlock`] (dropping it
/// releases a file lock; a Redis lock then expires after its TTL).
#[derive(Debug)]
pub enum RefreshLock {
    File(File),
    Redis { key: String, token: String },
}

impl TokenStore {
    /// The file backend in `dir`. Checks the token file's key at once.
    pub fn open_file(dir: PathBuf, key: StoreKey) -> Result<Self, StoreError> {
        let fs = FileStore::open(dir)?;
        let store = Self {
            backend: Backend::File(fs),
            key,
        };
        if let Backend::File(fs) = &store.backend {
            fs.read_tokens(&store.key)?;
            fs.read_devices()?;
        }
        Ok(store)
    }

    /// The Redis backend. Nothing is contacted until first use (or
    /// [`TokenStore::check`]); each new connection checks (or records, the
    /// first time) the key id.
    pub fn open_redis(endpoint: &RedisEndpoint, key: StoreKey) -> Result<Self, StoreError> {
        let r = RedisStore::new(endpoint, key.id())?;
        Ok(Self {
            backend: Backend::Redis(Box::new(r)),
            key,
        })
    }

    /// A blocking start-up check: `Err` for a wrong key or a corrupt
    /// store; `Ok(Some(reason))` when a Redis server cannot be reached now
    /// (popbridge starts and retries at first use).
    pub fn check_blocking(&self) -> Result<Option<String>, StoreError> {
        match &self.backend {
            Backend::File(f) => {
                f.read_tokens(&self.key)?;
                f.read_devices()?;
                Ok(None)
            }
            Backend::Redis(r) => r.check_blocking(),
        }
    }

    /// Reaches the backend now and checks the key.
    pub async fn check(&self) -> Result<(), StoreError> {
        match &self.backend {
            Backend::File(f) => {
                let (f, key) = (f.clone(), self.key.clone());
                blocking(move || f.read_tokens(&key).map(|_| ())).await
            }
            Backend::Redis(r) => r.check().await,
        }
    }

    pub fn key_id(&self) -> &str {
        self.key.id()
    }

    fn decrypt(&self, account: &str, s: StoredAccount) -> Result<AccountRecord, StoreError> {
        let plain = self.key.open(account, &s.sealed)?;
        let secrets: TokenSecrets = serde_json::from_slice(&plain).map_err(|_| {
            StoreError::Corrupt(format!("token record for {account} does not decode"))
        })?;
        Ok(AccountRecord {
            account: account.to_string(),
            meta: s.meta,
            secrets,
        })
    }

    fn encrypt(&self, r: &AccountRecord) -> Result<StoredAccount, StoreError> {
        let plain = serde_json::to_vec(&r.secrets).map_err(|e| StoreError::Io(e.to_string()))?;
        let sealed = self.key.seal(&r.account, &plain).map_err(StoreError::Io)?;
        Ok(StoredAccount {
            meta: r.meta.clone(),
            sealed,
        })
    }

    /// An account's record, decrypted.
    pub async fn get(&self, account: &str) -> Result<Option<AccountRecord>, StoreError> {
        let stored = match &self.backend {
            Backend::File(f) => {
                let (f, key, account) = (f.clone(), self.key.clone(), account.to_string());
                blocking(move || Ok(f.read_tokens(&key)?.accounts.remove(&account))).await?
            }
            Backend::Redis(r) => r.get_account(account).await?,
        };
        stored.map(|s| self.decrypt(account, s)).transpose()
    }

    /// Every account's clear metadata, sorted by name.
    pub async fn list(&self) -> Result<Vec<(String, AccountMeta)>, StoreError> {
        let all = match &self.backend {
            Backend::File(f) => {
                let (f, key) = (f.clone(), self.key.clone());
                blocking(move || Ok(f.read_tokens(&key)?.accounts)).await?
            }
            Backend::Redis(r) => r.all_accounts().await?,
        };
        Ok(all.into_iter().map(|(a, s)| (a, s.meta)).collect())
    }

    /// Writes `record` if the stored version is still `expected` (0: no
    /// record). The record's version becomes `expected + 1`, or for a new
    /// record [`first_version`]. Returns false, writing nothing, when
    /// someone else wrote in between.
    pub async fn compare_and_set(
        &self,
        record: &mut AccountRecord,
        expected: u64,
    ) -> Result<bool, StoreError> {
        record.meta.version = if expected == 0 {
            first_version()
        } else {
            expected + 1
        };
        record.meta.updated = now_unix();
        let stored = self.encrypt(record)?;
        match &self.backend {
            Backend::File(f) => {
                let (f, key, account) = (f.clone(), self.key.clone(), record.account.clone());
                blocking(move || {
                    f.update_tokens(&key, |file| {
                        let current = file.accounts.get(&account).map_or(0, |a| a.meta.version);
                        if current != expected {
                            return false;
                        }
                        file.accounts.insert(account, stored);
                        true
                    })
                })
                .await
            }
            Backend::Redis(r) => r.cas_account(&record.account, expected, &stored).await,
        }
    }

    /// Writes `record` whatever is stored (enrolment replaces the account).
    pub async fn put(&self, record: &mut AccountRecord) -> Result<(), StoreError> {
        loop {
            let current = match &self.backend {
                Backend::File(f) => {
                    let (f, key, account) = (f.clone(), self.key.clone(), record.account.clone());
                    blocking(move || {
                        // Tolerate an undecryptable record: it is replaced.
                        Ok(f.read_tokens(&key)?
                            .accounts
                            .get(&account)
                            .map_or(0, |a| a.meta.version))
                    })
                    .await?
                }
                Backend::Redis(r) => r
                    .get_account(&record.account)
                    .await?
                    .map_or(0, |a| a.meta.version),
            };
            if self.compare_and_set(record, current).await? {
                return Ok(());
            }
        }
    }

    /// Records that the account works now (an enrolment that replaced
    /// the record did so itself; this is for `oauth test`): sets
    /// [`AccountMeta::backoff_reset`] with a compare-and-set, retried when
    /// a refresh wrote in between. False if the account is not enrolled.
    pub async fn reset_backoff(&self, account: &str) -> Result<bool, StoreError> {
        loop {
            let Some(mut rec) = self.get(account).await? else {
                return Ok(false);
            };
            let expected = rec.meta.version;
            rec.meta.backoff_reset = now_unix_ms().max(rec.meta.backoff_reset + 1);
            if self.compare_and_set(&mut rec, expected).await? {
                return Ok(true);
            }
        }
    }

    /// Deletes an account's record; false if there was none.
    pub async fn remove(&self, account: &str) -> Result<bool, StoreError> {
        match &self.backend {
            Backend::File(f) => {
                let (f, key, account) = (f.clone(), self.key.clone(), account.to_string());
                blocking(move || {
                    f.update_tokens(&key, |file| file.accounts.remove(&account).is_some())
                })
                .await
            }
            Backend::Redis(r) => r.remove_account(account).await,
        }
    }

    /// Takes the per-account refresh lock, waiting up to
    /// [`REFRESH_LOCK_WAIT`] for another process that holds it.
    pub async fn lock(&self, account: &str) -> Result<RefreshLock, StoreError> {
        match &self.backend {
            Backend::File(f) => {
                let (f, account) = (f.clone(), account.to_string());
                blocking(move || f.lock_refresh(&account)).await
            }
            Backend::Redis(r) => r.lock(account).await,
        }
    }

    /// Releases a refresh lock (only if still ours, for Redis).
    pub async fn unlock(&self, lock: RefreshLock) {
        match (lock, &self.backend) {
            (RefreshLock::File(file), _) => drop(file),
            (RefreshLock::Redis { key, token }, Backend::Redis(r)) => r.unlock(&key, &token).await,
            (RefreshLock::Redis { .. }, _) => {}
        }
    }

    /// Seals a device record for storage.
    fn seal_device(&self, d: &DeviceRecord) -> Result<StoredDevice, StoreError> {
        let mut stored = StoredDevice {
            login: d.login.clone(),
            account: d.account.clone(),
            allow: d.allow.clone(),
            created: d.created,
            sealed: None,
            hash: None,
            undecodable: false,
        };
        let bound = stored.bound();
        let fields: Vec<&[u8]> = bound.iter().map(Vec::as_slice).collect();
        stored.sealed = Some(
            self.key
                .seal_device(&fields, d.hash.as_bytes())
                .map_err(StoreError::Io)?,
        );
        Ok(stored)
    }

    /// Checks a stored device record found under `login` and opens its
    /// hash.
    fn open_device(&self, login: &str, s: &StoredDevice) -> Result<DeviceRecord, DeviceProblem> {
        if s.undecodable {
            return Err(DeviceProblem::Tampered("not a device record".into()));
        }
        if s.login != login {
            return Err(DeviceProblem::Tampered(format!(
                "it names the login {:?}",
                s.login
            )));
        }
        let Some(sealed) = &s.sealed else {
            return Err(DeviceProblem::Unsealed);
        };
        let bound = s.bound();
        let fields: Vec<&[u8]> = bound.iter().map(Vec::as_slice).collect();
        let hash = self
            .key
            .open_device(login, &fields, sealed)
            .map_err(|e| match e {
                OpenError::WrongKey { .. } => {
                    DeviceProblem::Tampered("sealed with another key".into())
                }
                _ => DeviceProblem::Tampered("authentication failed".into()),
            })?;
        let hash = String::from_utf8(hash)
            .map_err(|_| DeviceProblem::Tampered("the sealed hash is not text".into()))?;
        Ok(DeviceRecord {
            login: s.login.clone(),
            hash,
            account: s.account.clone(),
            allow: s.allow.clone(),
            created: s.created,
        })
    }

    /// A device by login name, checked: a record that is not sealed with
    /// the store key, or whose seal does not match it, is
    /// [`StoreError::UntrustedDevice`].
    pub async fn device(&self, login: &str) -> Result<Option<DeviceRecord>, StoreError> {
        let stored = match &self.backend {
            Backend::File(f) => {
                let (f, login) = (f.clone(), login.to_string());
                blocking(move || Ok(f.read_devices()?.devices.remove(&login))).await?
            }
            Backend::Redis(r) => r.get_device(login).await?,
        };
        let Some(stored) = stored else {
            return Ok(None);
        };
        self.open_device(login, &stored)
            .map(Some)
            .map_err(|problem| StoreError::UntrustedDevice {
                login: login.to_string(),
                problem,
            })
    }

    /// Every device record, sorted by the login it is stored under, with
    /// the result of its check.
    pub async fn devices(&self) -> Result<Vec<DeviceListing>, StoreError> {
        let all: Vec<(String, StoredDevice)> = match &self.backend {
            Backend::File(f) => {
                let f = f.clone();
                blocking(move || Ok(f.read_devices()?.devices.into_iter().collect())).await?
            }
            Backend::Redis(r) => r.all_devices().await?,
        };
        Ok(all
            .into_iter()
            .map(|(login, record)| {
                let check = self.open_device(&login, &record).map(|_| ());
                DeviceListing {
                    login,
                    record,
                    check,
                }
            })
            .collect())
    }

    /// Adds a device; false (nothing written) if the login exists.
    pub async fn add_device(&self, d: DeviceRecord) -> Result<bool, StoreError> {
        let stored = self.seal_device(&d)?;
        match &self.backend {
            Backend::File(f) => {
                let f = f.clone();
                blocking(move || {
                    f.update_devices(|file| {
                        if file.devices.contains_key(&stored.login) {
                            return false;
                        }
                        file.devices.insert(stored.login.clone(), stored);
                        true
                    })
                })
                .await
            }
            Backend::Redis(r) => r.add_device(&stored).await,
        }
    }

    /// Seals a record written before device records were sealed, taking
    /// its hash, account and networks as they are (the operator vouches for
    /// them: `popbridge device seal`). Ok(false) when there is no such
    /// unsealed record (none, or already sealed); the record is replaced
    /// only if unchanged since it was read.
    pub async fn seal_unsealed_device(&self, login: &str) -> Result<bool, StoreError> {
        let old = match &self.backend {
            Backend::File(f) => {
                let (f, login) = (f.clone(), login.to_string());
                blocking(move || Ok(f.read_devices()?.devices.remove(&login))).await?
            }
            Backend::Redis(r) => r.get_device(login).await?,
        };
        let Some(old) = old else { return Ok(false) };
        let (Some(hash), None) = (&old.hash, &old.sealed) else {
            return Ok(false);
        };
        if old.login != login {
            return Err(StoreError::UntrustedDevice {
                login: login.to_string(),
                problem: DeviceProblem::Tampered(format!("it names the login {:?}", old.login)),
            });
        }
        let new = self.seal_device(&DeviceRecord {
            login: old.login.clone(),
            hash: hash.clone(),
            account: old.account.clone(),
            allow: old.allow.clone(),
            created: old.created,
        })?;
        match &self.backend {
            Backend::File(f) => {
                let f = f.clone();
                blocking(move || {
                    f.update_devices(|file| {
                        if file.devices.get(&old.login) != Some(&old) {
                            return false;
                        }
                        file.devices.insert(new.login.clone(), new);
                        true
                    })
                })
                .await
            }
            Backend::Redis(r) => r.replace_device(&old, &new).await,
        }
    }

    /// Removes a device; false if there was none.
    pub async fn remove_device(&self, login: &str) -> Result<bool, StoreError> {
        match &self.backend {
            Backend::File(f) => {
                let (f, login) = (f.clone(), login.to_string());
                blocking(move || f.update_devices(|file| file.devices.remove(&login).is_some()))
                    .await
            }
            Backend::Redis(r) => r.remove_device(login).await,
        }
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| StoreError::Io(format!("store task failed: {e}")))?
}

/// The token file.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct TokensFile {
    format: String,
    version: u32,
    /// Id of the key every record is sealed with.
    key_id: String,
    accounts: BTreeMap<String, StoredAccount>,
}

/// The device file.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct DevicesFile {
    format: String,
    version: u32,
    devices: BTreeMap<String, StoredDevice>,
}

/// Files in one directory. Every change is read-modify-write under an
/// exclusive `flock` on `store.lock`, written to a temporary file in the
/// same directory, fsynced, renamed over the old file, and the directory
/// fsynced: a crash leaves the old or the new file, never a mix. The
/// previous generation is kept as `<name>.bak`.
#[derive(Debug, Clone)]
pub struct FileStore {
    dir: PathBuf,
}

impl FileStore {
    pub fn open(dir: PathBuf) -> Result<Self, StoreError> {
        // 0700 from creation (no window in which a new directory is
        // readable by others); an existing one is tightened below.
        let mut b = std::fs::DirBuilder::new();
        b.recursive(true);
        #[cfg(unix)]
        std::os::unix::fs::DirBuilderExt::mode(&mut b, 0o700);
        b.create(&dir)
            .map_err(|e| StoreError::Io(format!("cannot create {}: {e}", dir.display())))?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700));
        }
        Ok(Self { dir })
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Holds the store-wide write lock while `f` runs.
    fn with_lock<T>(&self, f: impl FnOnce() -> Result<T, StoreError>) -> Result<T, StoreError> {
        let lock = open_lock_file(&self.path("store.lock"))?;
        flock(&lock, true, &self.dir)?;
        let out = f();
        drop(lock);
        out
    }

    fn read_tokens(&self, key: &StoreKey) -> Result<TokensFile, StoreError> {
        let path = self.path(TOKENS_FILE);
        let file: Option<TokensFile> = read_json(&path)?;
        let file = file.unwrap_or_else(|| TokensFile {
            format: TOKENS_FORMAT.into(),
            version: FILE_VERSION,
            key_id: key.id().to_string(),
            accounts: BTreeMap::new(),
        });
        if file.format != TOKENS_FORMAT || file.version != FILE_VERSION {
            return Err(StoreError::Corrupt(format!(
                "{}: not a popbridge token file of version {FILE_VERSION} (format {:?}, version {})",
                path.display(),
                file.format,
                file.version
            )));
        }
        if file.key_id != key.id() {
            return Err(OpenError::WrongKey {
                found: file.key_id,
                expected: key.id().to_string(),
            }
            .into());
        }
        Ok(file)
    }

    fn update_tokens<T>(
        &self,
        key: &StoreKey,
        f: impl FnOnce(&mut TokensFile) -> T,
    ) -> Result<T, StoreError> {
        self.with_lock(|| {
            let mut file = self.read_tokens(key)?;
            let out = f(&mut file);
            write_json(&self.dir, TOKENS_FILE, &file)?;
            Ok(out)
        })
    }

    fn read_devices(&self) -> Result<DevicesFile, StoreError> {
        let path = self.path(DEVICES_FILE);
        let file: Option<DevicesFile> = read_json(&path)?;
        let file = file.unwrap_or_else(|| DevicesFile {
            format: DEVICES_FORMAT.into(),
            version: FILE_VERSION,
            devices: BTreeMap::new(),
        });
        if file.format != DEVICES_FORMAT || file.version != FILE_VERSION {
            return Err(StoreError::Corrupt(format!(
                "{}: not a popbridge device file of version {FILE_VERSION}",
                path.display()
            )));
        }
        Ok(file)
    }

    fn update_devices<T>(&self, f: impl FnOnce(&mut DevicesFile) -> T) -> Result<T, StoreError> {
        self.with_lock(|| {
            let mut file = self.read_devices()?;
            let out = f(&mut file);
            write_json(&self.dir, DEVICES_FILE, &file)?;
            Ok(out)
        })
    }

    /// One lock file per account (named by a hash, so any account name is
    /// a safe file name), held with `flock` until the returned file drops.
    fn lock_refresh(&self, account: &str) -> Result<RefreshLock, StoreError> {
        let name = format!(
            "refresh-{}.lock",
            hex::encode(
                &ring::digest::digest(&ring::digest::SHA256, account.as_bytes()).as_ref()[..16]
            )
        );
        let file = open_lock_file(&self.path(&name))?;
        let deadline = std::time::Instant::now() + REFRESH_LOCK_WAIT;
        loop {
            match file.try_lock() {
                Ok(()) => return Ok(RefreshLock::File(file)),
                Err(std::fs::TryLockError::WouldBlock) => {}
                Err(std::fs::TryLockError::Error(e)) => {
                    return Err(StoreError::Io(format!("cannot lock {name}: {e}")))
                }
            }
            if std::time::Instant::now() >= deadline {
                return Err(StoreError::LockTimeout(account.to_string()));
            }
            std::thread::sleep(LOCK_POLL);
        }
    }
}

fn open_lock_file(path: &Path) -> Result<File, StoreError> {
    let mut o = OpenOptions::new();
    o.create(true).truncate(false).read(true).write(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut o, 0o600);
    o.open(path)
        .map_err(|e| StoreError::Io(format!("cannot open {}: {e}", path.display())))
}

fn flock(file: &File, exclusive: bool, dir: &Path) -> Result<(), StoreError> {
    // Blocking is fine here: the caller runs on a blocking thread and
    // holders only do file I/O. (std's locks are flock(2) on Unix.)
    let r = if exclusive {
        file.lock()
    } else {
        file.lock_shared()
    };
    r.map_err(|e| StoreError::Io(format!("cannot lock the store in {}: {e}", dir.display())))
}

/// Reads a JSON store file. Missing: `None`, unless its `.bak` exists
/// (then something deleted it, and an empty store would silently drop
/// every account). Truncated or corrupt: a clear error, never empty.
fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Option<T>, StoreError> {
    let backup = backup_path(path);
    let bytes = match File::open(path) {
        Ok(f) => {
            let len = f.metadata().map(|m| m.len()).unwrap_or(0);
            if len > MAX_FILE_BYTES {
                return Err(StoreError::Corrupt(format!(
                    "{} is {len} bytes, more than the {MAX_FILE_BYTES} a store file may have",
                    path.display()
                )));
            }
            std::fs::read(path)
                .map_err(|e| StoreError::Io(format!("cannot read {}: {e}", path.display())))?
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if backup.exists() {
                return Err(StoreError::Corrupt(format!(
                    "{} is missing but its previous generation {} exists: refusing to start with an empty store; copy the backup into place (or delete it to start empty)",
                    path.display(),
                    backup.display()
                )));
            }
            return Ok(None);
        }
        Err(e) => {
            return Err(StoreError::Io(format!(
                "cannot read {}: {e}",
                path.display()
            )))
        }
    };
    serde_json::from_slice(&bytes).map(Some).map_err(|e| {
        let hint = if backup.exists() {
            format!(
                "; the previous generation is kept in {}: check it and copy it over the damaged file to recover (a refresh token rotated since then may need `popbridge oauth add`)",
                backup.display()
            )
        } else {
            String::new()
        };
        StoreError::Corrupt(format!(
            "{} is truncated or corrupt ({} bytes; {}); refusing to treat it as empty{hint}",
            path.display(),
            bytes.len(),
            // serde_json's message names a line and column, not content.
            e.classify_name()
        ))
    })
}

trait ClassifyName {
    fn classify_name(&self) -> String;
}

impl ClassifyName for serde_json::Error {
    fn classify_name(&self) -> String {
        let what = match self.classify() {
            serde_json::error::Category::Eof => "ends early",
            serde_json::error::Category::Syntax => "syntax error",
            serde_json::error::Category::Data => "unexpected data",
            serde_json::error::Category::Io => "read error",
        };
        format!("{what} at line {} column {}", self.line(), self.column())
    }
}

fn backup_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(BACKUP_SUFFIX);
    PathBuf::from(s)
}

/// Atomic replace: temp file in the same directory, fsync, keep the old
/// file as `.bak`, rename, fsync the directory (so the rename survives a
/// power loss).
fn write_json<T: Serialize>(dir: &Path, name: &str, value: &T) -> Result<(), StoreError> {
    let io = |what: &str, p: &Path, e: std::io::Error| {
        StoreError::Io(format!("cannot {what} {}: {e}", p.display()))
    };
    let path = dir.join(name);
    let bytes = serde_json::to_vec_pretty(value).map_err(|e| StoreError::Io(e.to_string()))?;
    let mut rnd = [0u8; 8];
    getrandom::getrandom(&mut rnd).map_err(|e| StoreError::Io(e.to_string()))?;
    let tmp = dir.join(format!("{name}.tmp-{}", hex::encode(rnd)));
    {
        let mut o = OpenOptions::new();
        o.create_new(true).write(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut o, 0o600);
        let mut f = o.open(&tmp).map_err(|e| io("create", &tmp, e))?;
        let written = f.write_all(&bytes).and_then(|()| f.sync_all());
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(io("write", &tmp, e));
        }
    }
    if path.exists() {
        let backup = backup_path(&path);
        let btmp = dir.join(format!("{name}.bak-tmp-{}", hex::encode(rnd)));
        // Not std::fs::copy: it gives the copy the source's mode (a file
        // restored by hand may be 0644), and follows a symlink in place of
        // the temp name. The backup holds the same secrets: 0600 from
        // creation, O_EXCL.
        let kept = (|| {
            let mut src = File::open(&path)?;
            let mut o = OpenOptions::new();
            o.create_new(true).write(true);
            #[cfg(unix)]
            std::os::unix::fs::OpenOptionsExt::mode(&mut o, 0o600);
            let mut dst = o.open(&btmp)?;
            std::io::copy(&mut src, &mut dst)?;
            dst.sync_all()?;
            std::fs::rename(&btmp, &backup)
        })();
        if let Err(e) = kept {
            let _ = std::fs::remove_file(&btmp);
            let _ = std::fs::remove_file(&tmp);
            return Err(io("keep the previous generation of", &path, e));
        }
    }
    if let Err(e) = std::fs::rename(&tmp, &path) {
        let _ = std::fs::remove_file(&tmp);
        return Err(io("replace", &path, e));
    }
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io("sync", dir, e))?;
    Ok(())
}

/// The version a new account record starts at: the time in microseconds
/// since 1970. An account removed and enrolled again then never reuses a
/// version that a refresh still in flight for the old record expects, so
/// that refresh loses its compare-and-set instead of overwriting the new
/// enrolment (no ABA). Below 2^53, so Redis's Lua (doubles) compares it
/// exactly.
fn first_version() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| {
            u64::try_from(d.as_micros()).unwrap_or(u64::MAX >> 11)
        })
        .max(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::oauth::KeyMaterial;

    fn key(b: u8) -> StoreKey {
        StoreKey::new(&KeyMaterial([b; 32]))
    }

    fn record(account: &str, refresh: &str) -> AccountRecord {
        AccountRecord {
            account: account.into(),
            meta: AccountMeta {
                provider: "p".into(),
                scopes: vec!["s".into()],
                status: AccountStatus::Active,
                created: 1,
                updated: 1,
                version: 0,
                backoff_reset: 0,
            },
            secrets: TokenSecrets {
                refresh_token: refresh.into(),
                access_token: None,
                access_expires_at: None,
                access_issued_at_ms: None,
            },
        }
    }

    #[tokio::test]
    async fn file_round_trip_cas_and_no_clear_secret_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        let s = TokenStore::open_file(dir.path().into(), key(1)).unwrap();
        let mut r = record("alice@example.org", "RT-ONE-SECRET");
        assert!(s.compare_and_set(&mut r, 0).await.unwrap());
        let v1 = r.meta.version;
        assert!(v1 > 1, "a new record starts at a time-based version");
        let back = s.get("alice@example.org").await.unwrap().unwrap();
        assert_eq!(back.secrets.refresh_token, "RT-ONE-SECRET");
        // A stale writer loses.
        let mut stale = record("alice@example.org", "RT-STALE");
        assert!(!s.compare_and_set(&mut stale, 0).await.unwrap());
        let mut newer = back.clone();
        newer.secrets.refresh_token = "RT-TWO".into();
        assert!(s.compare_and_set(&mut newer, v1).await.unwrap());
        assert_eq!(newer.meta.version, v1 + 1);
        assert_eq!(
            s.get("alice@example.org")
                .await
                .unwrap()
                .unwrap()
                .secrets
                .refresh_token,
            "RT-TWO"
        );
        let text = std::fs::read_to_string(dir.path().join(TOKENS_FILE)).unwrap();
        assert!(!text.contains("RT-"), "{text}");
        assert!(dir.path().join("tokens.json.bak").exists());
        assert_eq!(s.list().await.unwrap().len(), 1);
        assert!(s.remove("alice@example.org").await.unwrap());
        assert!(s.get("alice@example.org").await.unwrap().is_none());
    }

    #[tokio::test]
    async fn a_refresh_in_flight_cannot_overwrite_a_re_enrolment() {
        let dir = tempfile::tempdir().unwrap();
        let s = TokenStore::open_file(dir.path().into(), key(1)).unwrap();
        let mut old = record("alice@example.org", "RT-OLD");
        assert!(s.compare_and_set(&mut old, 0).await.unwrap());
        // A refresh reads the record (and its version) ...
        let mut in_flight = s.get("alice@example.org").await.unwrap().unwrap();
        let expected = in_flight.meta.version;
        // ... meanwhile the operator removes the account and enrols it anew.
        assert!(s.remove("alice@example.org").await.unwrap());
        std::thread::sleep(std::time::Duration::from_millis(2));
        let mut fresh = record("alice@example.org", "RT-NEW-ENROLMENT");
        s.put(&mut fresh).await.unwrap();
        // The refresh's compare-and-set must lose.
        in_flight.secrets.refresh_token = "RT-FROM-OLD-FAMILY".into();
        assert!(!s.compare_and_set(&mut in_flight, expected).await.unwrap());
        let stored = s.get("alice@example.org").await.unwrap().unwrap();
        assert_eq!(stored.secrets.refresh_token, "RT-NEW-ENROLMENT");
    }

    #[cfg(unix)]
    #[tokio::test]
    async fn store_files_and_backups_are_private() {
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("oauth");
        let s = TokenStore::open_file(data.clone(), key(1)).unwrap();
        assert_eq!(mode(&data), 0o700);
        let mut r = record("alice@example.org", "RT-ONE");
        assert!(s.compare_and_set(&mut r, 0).await.unwrap());
        let tokens = data.join(TOKENS_FILE);
        assert_eq!(mode(&tokens), 0o600);
        // Restored by hand with `cp` under umask 022: the next generation
        // and its backup must still be private.
        std::fs::set_permissions(&tokens, std::fs::Permissions::from_mode(0o644)).unwrap();
        let mut r2 = s.get("alice@example.org").await.unwrap().unwrap();
        let v = r2.meta.version;
        assert!(s.compare_and_set(&mut r2, v).await.unwrap());
        assert_eq!(mode(&tokens), 0o600);
        assert_eq!(mode(&backup_path(&tokens)), 0o600);
        s.add_device(DeviceRecord {
            login: "phone".into(),
            account: "alice@example.org".into(),
            hash: "$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHQ$aGFzaA".into(),
            allow: vec![],
            created: 1,
        })
        .await
        .unwrap();
        assert_eq!(mode(&data.join(DEVICES_FILE)), 0o600);
    }

    #[tokio::test]
    async fn wrong_key_is_refused_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let s = TokenStore::open_file(dir.path().into(), key(1)).unwrap();
        s.put(&mut record("a", "rt")).await.unwrap();
        let e = TokenStore::open_file(dir.path().into(), key(2)).unwrap_err();
        assert!(e.to_string().contains("another key"), "{e}");
    }

    #[tokio::test]
    async fn truncated_file_is_refused_with_the_backup_named() {
        let dir = tempfile::tempdir().unwrap();
        let s = TokenStore::open_file(dir.path().into(), key(1)).unwrap();
        s.put(&mut record("a", "rt")).await.unwrap();
        s.put(&mut record("b", "rt")).await.unwrap();
        let path = dir.path().join(TOKENS_FILE);
        let full = std::fs::read(&path).unwrap();
        std::fs::write(&path, &full[..full.len() / 2]).unwrap();
        let e = TokenStore::open_file(dir.path().into(), key(1)).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("truncated or corrupt") && msg.contains(".bak"),
            "{msg}"
        );
        assert!(!msg.contains("ciphertext"), "{msg}");
        // A crash before the rename leaves only a temp file: ignored.
        std::fs::write(&path, &full).unwrap();
        std::fs::write(dir.path().join("tokens.json.tmp-dead"), b"{\"form").unwrap();
        let s = TokenStore::open_file(dir.path().into(), key(1)).unwrap();
        assert_eq!(s.list().await.unwrap().len(), 2);
        // Deleted file with a backup beside it: not silently empty.
        std::fs::remove_file(&path).unwrap();
        let e = TokenStore::open_file(dir.path().into(), key(1)).unwrap_err();
        assert!(e.to_string().contains("missing"), "{e}");
    }

    #[tokio::test]
    async fn devices_add_once_and_debug_hides_hashes() {
        let dir = tempfile::tempdir().unwrap();
        let s = TokenStore::open_file(dir.path().into(), key(1)).unwrap();
        let d = DeviceRecord {
            login: "scanner".into(),
            hash: "$argon2id$SECRETHASH".into(),
            account: "a".into(),
            allow: vec![],
            created: 1,
        };
        assert!(s.add_device(d.clone()).await.unwrap());
        assert!(!s.add_device(d.clone()).await.unwrap());
        assert!(!format!("{d:?}").contains("SECRETHASH"));
        assert_eq!(s.devices().await.unwrap().len(), 1);
        assert!(s.remove_device("scanner").await.unwrap());
        assert!(!s.remove_device("scanner").await.unwrap());
    }

    #[tokio::test]
    async fn device_records_are_sealed_checked_and_legacy_ones_sealed_on_request() {
        let dir = tempfile::tempdir().unwrap();
        let s = TokenStore::open_file(dir.path().into(), key(1)).unwrap();
        let d = DeviceRecord {
            login: "scanner".into(),
            hash: "$argon2id$SECRETHASH".into(),
            account: "a".into(),
            allow: vec!["10.0.0.0/8".parse().unwrap()],
            created: 7,
        };
        assert!(s.add_device(d.clone()).await.unwrap());
        let text = std::fs::read_to_string(dir.path().join(DEVICES_FILE)).unwrap();
        assert!(
            !text.contains("SECRETHASH") && text.contains("sealed"),
            "{text}"
        );
        assert_eq!(s.device("scanner").await.unwrap(), Some(d.clone()));
        // Another key cannot vouch for it.
        let other = TokenStore::open_file(dir.path().into(), key(2));
        if let Ok(other) = other {
            assert!(matches!(
                other.device("scanner").await,
                Err(StoreError::UntrustedDevice { .. })
            ));
        }
        // An altered account.
        std::fs::write(
            dir.path().join(DEVICES_FILE),
            text.replace("\"account\": \"a\"", "\"account\": \"b\""),
        )
        .unwrap();
        match s.device("scanner").await {
            Err(StoreError::UntrustedDevice {
                problem: DeviceProblem::Tampered(_),
                ..
            }) => {}
            other => panic!("{other:?}"),
        }
        // A record of the old format: refused until sealed on request.
        std::fs::write(
            dir.path().join(DEVICES_FILE),
            r#"{"format": "popbridge-oauth-devices", "version": 1, "devices": {"old": {"login": "old", "hash": "$argon2id$OLD", "account": "a", "allow": [], "created": 1}}}"#,
        )
        .unwrap();
        match s.device("old").await {
            Err(
                e @ StoreError::UntrustedDevice {
                    problem: DeviceProblem::Unsealed,
                    ..
                },
            ) => assert!(e.to_string().contains("popbridge device seal old"), "{e}"),
            other => panic!("{other:?}"),
        }
        assert!(s.seal_unsealed_device("old").await.unwrap());
        assert!(!s.seal_unsealed_device("old").await.unwrap(), "once");
        assert_eq!(
            s.device("old").await.unwrap().map(|d| d.hash),
            Some("$argon2id$OLD".to_string())
        );
        assert!(!s.seal_unsealed_device("nobody").await.unwrap());
    }

    #[tokio::test]
    async fn refresh_lock_excludes_a_second_holder() {
        let dir = tempfile::tempdir().unwrap();
        let f = FileStore::open(dir.path().into()).unwrap();
        let l1 = f.lock_refresh("a").unwrap();
        // flock locks are per open file description: a second open of the
        // same file cannot take it while the first is held.
        let file = open_lock_file(&dir.path().join(format!(
            "refresh-{}.lock",
            hex::encode(&ring::digest::digest(&ring::digest::SHA256, b"a").as_ref()[..16])
        )))
        .unwrap();
        assert!(matches!(
            file.try_lock(),
            Err(std::fs::TryLockError::WouldBlock)
        ));
        drop(l1);
        file.try_lock().unwrap();
    }
}
