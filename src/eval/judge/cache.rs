//! On-disk cache of judge replies, so that a re-run never pays for the same comparison twice.
//!
//! Layout: one JSON file per key, `<dir>/<key[0..2]>/<key>.json`, written atomically (a uniquely
//! named temporary file in the same folder, then a rename), so concurrent writers and crashes
//! never leave a half-written entry; the last complete write of a key wins. The key is a
//! SHA-256 over the server's base URL, the judge model, the sampling settings, the full prompt
//! text and the order (see [`cache_key`]). Only complete replies are cached (decided or
//! unparseable), never failures (nor refusals or replies cut at the token limit), so a re-run
//! asks those again. Nothing secret is stored: no headers, no API key.

use super::Usage;
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Format version of the entries (part of the key). Version 2 added the server's base URL to
/// the key.
pub const CACHE_VERSION: u32 = 2;

/// One cached reply.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CacheEntry {
    pub version: u32,
    pub key: String,
    /// The judge model that was asked.
    pub model: String,
    /// The order of the comparison (candidate shown as B).
    pub flipped: bool,
    /// The judge's reply text.
    pub reply: String,
    pub usage: Usage,
    /// The model name the server reported, if any.
    pub response_model: Option<String>,
    /// Seconds since the Unix epoch when the reply was stored.
    pub created_unix: u64,
}

/// The cache key of a comparison: hex SHA-256 over the cache version, the server's base URL (two
/// servers may serve different models under one name), the judge model, the temperature, the
/// token limit, the order and the full prompt text (which already contains both summaries in
/// their shown positions).
pub fn cache_key(
    base_url: &str,
    model: &str,
    temperature: f64,
    max_tokens: u32,
    flipped: bool,
    prompt: &str,
) -> String {
    let mut h = crate::util::Hasher::new();
    h.update(b"overopt/judge/cache");
    h.update(&CACHE_VERSION.to_le_bytes());
    h.update(&(base_url.len() as u64).to_le_bytes());
    h.update(base_url.as_bytes());
    h.update(&(model.len() as u64).to_le_bytes());
    h.update(model.as_bytes());
    h.update(&temperature.to_bits().to_le_bytes());
    h.update(&max_tokens.to_le_bytes());
    h.update(&[u8::from(flipped)]);
    h.update(prompt.as_bytes());
    h.hex()
}

/// A folder of cached replies.
#[derive(Debug, Clone)]
pub struct VerdictCache {
    dir: PathBuf,
}

impl VerdictCache {
    /// Open (and create) a cache folder.
    pub fn open(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create judge cache directory {}", dir.display()))?;
        Ok(Self {
            dir: dir.to_path_buf(),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where the entry of `key` lives.
    pub fn path(&self, key: &str) -> PathBuf {
        let shard = key.get(..2).unwrap_or("xx");
        self.dir.join(shard).join(format!("{key}.json"))
    }

    /// The entry of `key`, if present and valid. An unreadable or corrupt entry (or one whose
    /// recorded key differs) is reported on stderr and treated as a miss; it is overwritten when
    /// the comparison is fetched again.
    pub fn get(&self, key: &str) -> Option<CacheEntry> {
        let path = self.path(key);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
            Err(e) => {
                eprintln!(
                    "warning: judge cache: cannot read {}: {e}; treating as a miss",
                    path.display()
                );
                return None;
            }
        };
        match serde_json::from_str::<CacheEntry>(&text) {
            Ok(e) if e.key == key && e.version == CACHE_VERSION => Some(e),
            Ok(_) => {
                eprintln!(
                    "warning: judge cache: {} holds another key or version; treating as a miss",
                    path.display()
                );
                None
            }
            Err(e) => {
                eprintln!(
                    "warning: judge cache: {} is not a valid entry ({e}); treating as a miss",
                    path.display()
                );
                None
            }
        }
    }

    /// Store an entry atomically and durably (`util::write_atomic`: a uniquely named temporary
    /// file, fsync, rename), so concurrent writers and crashes never leave a half-written entry.
    pub fn put(&self, entry: &CacheEntry) -> Result<()> {
        crate::util::write_atomic(&self.path(&entry.key), &serde_json::to_vec(entry)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(key: &str) -> CacheEntry {
        CacheEntry {
            version: CACHE_VERSION,
            key: key.to_string(),
            model: "m".into(),
            flipped: true,
            reply: "Preferred: A".into(),
            usage: Usage {
                prompt_tokens: 3,
                completion_tokens: 2,
            },
            response_model: None,
            created_unix: 0,
        }
    }

    #[test]
    fn key_depends_on_every_part() {
        let base = cache_key("u", "m", 0.0, 64, false, "p");
        assert_eq!(base, cache_key("u", "m", 0.0, 64, false, "p"));
        for other in [
            cache_key("u", "m2", 0.0, 64, false, "p"),
            cache_key("v", "m", 0.0, 64, false, "p"),
            cache_key("um", "", 0.0, 64, false, "p"),
            cache_key("u", "m", 0.5, 64, false, "p"),
            cache_key("u", "m", 0.0, 65, false, "p"),
            cache_key("u", "m", 0.0, 64, true, "p"),
            cache_key("u", "m", 0.0, 64, false, "p "),
        ] {
            assert_ne!(base, other);
        }
    }

    #[test]
    fn put_get_roundtrip_and_corrupt_entry_is_a_miss() {
        let d = tempfile::tempdir().unwrap();
        let c = VerdictCache::open(&d.path().join("cache")).unwrap();
        let k = cache_key("u", "m", 0.0, 64, true, "prompt");
        assert!(c.get(&k).is_none());
        c.put(&entry(&k)).unwrap();
        assert_eq!(c.get(&k), Some(entry(&k)));
        c.put(&entry(&k)).unwrap(); // overwrite is fine
        // Only the entry itself remains in its shard folder (no temporaries).
        assert_eq!(
            std::fs::read_dir(c.path(&k).parent().unwrap())
                .unwrap()
                .count(),
            1
        );
        std::fs::write(c.path(&k), "{not json").unwrap();
        assert!(c.get(&k).is_none());
        // An entry stored under the wrong file name is not trusted.
        let k2 = cache_key("u", "m", 0.0, 64, false, "prompt");
        std::fs::create_dir_all(c.path(&k2).parent().unwrap()).unwrap();
        std::fs::write(c.path(&k2), serde_json::to_string(&entry(&k)).unwrap()).unwrap();
        assert!(c.get(&k2).is_none());
    }
}
