//! The imported UIDL map at login (`pop3.uidl_map`): which old UIDLs the
//! messages of a fresh snapshot get.
//!
//! Precedence, as in Dovecot's POP3 server: a valid `X-UIDL:` header (when
//! `reuse_xuidl` is on) > the imported map > the template. Duplicates are
//! then renamed by [`crate::pop3::maildrop::Maildrop::set_uidls`].
//!
//! Maps are read-mostly files; each is parsed once and kept in memory,
//! keyed by path and re-read only when the file changes (a new `popbridge
//! migrate` run, a new volume shipped): one `stat` per login.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use super::store::{MapKey, StoreError, UidlMap};

/// Map entries kept in memory at most, over all cached maps (an entry is
/// some 100 octets with its UIDL, so about 200 MB at the limit). Least
/// recently used maps are dropped first and re-read at their next login.
pub const CACHE_MAX_ENTRIES: u64 = 2_000_000;

/// What identifies one version of a file: modification time, length,
/// inode and change time. A replacement by rename (as `popbridge migrate`
/// and volume syncs do) always has a new inode, so even a rewrite within
/// one timestamp tick and of the same length is noticed.
type Stamp = (SystemTime, u64, u64, i64, i64);

fn stamp(meta: &std::fs::Metadata) -> Stamp {
    use std::os::unix::fs::MetadataExt;
    (
        meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
        meta.len(),
        meta.ino(),
        meta.ctime(),
        meta.ctime_nsec(),
    )
}

/// A cached parse, valid while the file's stamp is unchanged. Failures are
/// cached too, so a corrupt file is not re-read at every poll.
#[derive(Debug, Clone)]
struct Cached {
    stamp: Stamp,
    map: Result<Arc<UidlMap>, Arc<str>>,
}

/// The maps under one data directory, with their in-memory cache.
#[derive(Debug, Clone)]
pub struct MapStore {
    dir: PathBuf,
    cache: moka::sync::Cache<PathBuf, Cached>,
}

/// What the map says for one login.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    /// No map for this account (normal: not every account was migrated).
    None,
    /// UID → old UIDL for the UIDs in the snapshot.
    Overrides(HashMap<u32, String>),
    /// The map was made for another UIDVALIDITY: the mailbox was recreated
    /// since, and its UIDs mean other messages now. Ignored.
    StaleUidvalidity { map: u32, mailbox: u32 },
}

impl MapStore {
    /// The store under `data_dir` (maps in `data_dir/uidl-maps/`).
    pub fn new(data_dir: &Path) -> Self {
        Self {
            dir: data_dir.to_path_buf(),
            cache: moka::sync::Cache::builder()
                .max_capacity(CACHE_MAX_ENTRIES)
                .weigher(|_, v: &Cached| {
                    let n = v.map.as_ref().map_or(1, |m| m.entries.len() + 1);
                    u32::try_from(n).unwrap_or(u32::MAX)
                })
                .build(),
        }
    }

    /// The map for an account, from the cache when the file is unchanged.
    /// `Ok(None)` when there is no map file.
    pub fn load(&self, key: &MapKey) -> Result<Option<Arc<UidlMap>>, StoreError> {
        let path = key.map_path(&self.dir);
        let meta = match std::fs::metadata(&path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                self.cache.invalidate(&path);
                return Ok(None);
            }
            Err(source) => return Err(StoreError::Io { path, source }),
        };
        let stamp = stamp(&meta);
        let cached = self.cache.get(&path).filter(|c| c.stamp == stamp);
        let cached = match cached {
            Some(c) => c,
            None => {
                let map = match UidlMap::load(&path) {
                    Ok(Some(m)) if m.key == *key => Ok(Arc::new(m)),
                    Ok(Some(m)) => Err(format!(
                        "{}: made for {}/{}/{}, not this account",
                        path.display(),
                        m.key.upstream,
                        m.key.account,
                        m.key.mailbox
                    )
                    .into()),
                    Ok(None) => return Ok(None),
                    Err(e) => Err(e.to_string().into()),
                };
                let c = Cached { stamp, map };
                self.cache.insert(path.clone(), c.clone());
                c
            }
        };
        match cached.map {
            Ok(m) => Ok(Some(m)),
            Err(why) => Err(StoreError::Corrupt {
                path,
                line: 0,
                why: why.to_string(),
            }),
        }
    }

    /// The overrides for a snapshot: map entries for the UIDs present, if
    /// the map's UIDVALIDITY is the mailbox's.
    pub fn lookup(
        &self,
        key: &MapKey,
        uidvalidity: u32,
        uids: impl Iterator<Item = u32>,
    ) -> Result<Lookup, StoreError> {
        let Some(map) = self.load(key)? else {
            return Ok(Lookup::None);
        };
        Ok(overrides(&map, uidvalidity, uids))
    }
}

/// Map entries for the given UIDs, unless UIDVALIDITY differs (RFC 3501
/// §2.3.1.1: a new UIDVALIDITY means the old UIDs are meaningless).
pub fn overrides(map: &UidlMap, uidvalidity: u32, uids: impl Iterator<Item = u32>) -> Lookup {
    if map.uidvalidity != uidvalidity {
        return Lookup::StaleUidvalidity {
            map: map.uidvalidity,
            mailbox: uidvalidity,
        };
    }
    Lookup::Overrides(
        uids.filter_map(|u| map.entries.get(&u).map(|v| (u, v.clone())))
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::migrate::store::write_atomic;
    use std::collections::BTreeMap;

    fn map(key: &MapKey, entries: &[(u32, &str)]) -> UidlMap {
        UidlMap {
            key: key.clone(),
            uidvalidity: 77,
            created: 1,
            redownloads: Some(0),
            entries: entries
                .iter()
                .map(|&(u, s)| (u, s.to_string()))
                .collect::<BTreeMap<_, _>>(),
        }
    }

    #[test]
    fn lookup_missing_present_stale_changed_and_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        let store = MapStore::new(dir.path());
        let key = MapKey::new("h:143", "alice", "INBOX");
        assert_eq!(store.lookup(&key, 77, 1..5).unwrap(), Lookup::None);

        let path = key.map_path(dir.path());
        write_atomic(
            &path,
            &map(&key, &[(1, "a"), (3, "c"), (9, "z")]).to_bytes(),
        )
        .unwrap();
        let Lookup::Overrides(o) = store.lookup(&key, 77, 1..5).unwrap() else {
            panic!("expected overrides")
        };
        assert_eq!(o, HashMap::from([(1, "a".into()), (3, "c".into())]));
        assert_eq!(
            store.lookup(&key, 78, 1..5).unwrap(),
            Lookup::StaleUidvalidity {
                map: 77,
                mailbox: 78
            }
        );
        // A changed file (another length) is read again.
        write_atomic(&path, &map(&key, &[(1, "a-new-uidl")]).to_bytes()).unwrap();
        let Lookup::Overrides(o) = store.lookup(&key, 77, 1..5).unwrap() else {
            panic!("expected overrides")
        };
        assert_eq!(o[&1], "a-new-uidl");
        // Corrupt: an error (the caller logs it and serves template UIDLs).
        std::fs::write(&path, b"popbridge-uidl-map\t1\tgarbage\n").unwrap();
        assert!(store.lookup(&key, 77, 1..5).is_err());
        // A map written for another account under this name is refused.
        let other = MapKey::new("h:143", "bob", "INBOX");
        write_atomic(&path, &map(&other, &[(1, "b")]).to_bytes()).unwrap();
        assert!(store.lookup(&key, 77, 1..5).is_err());
        std::fs::remove_file(&path).unwrap();
        assert_eq!(store.lookup(&key, 77, 1..5).unwrap(), Lookup::None);
    }
}
