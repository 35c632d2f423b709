//! Cache-first access to Hugging Face hub repositories (models and datasets), shared by `data`
//! and `model` (it sits below both in the module order and imports neither).
//!
//! Files are looked up in the standard hub cache first (`<cache>/<kind>s--org--name/refs/<rev>`
//! holds a commit hash, `snapshots/<hash>/<path>` the file), so anything downloaded once is
//! read again without a network call. Only on a cache miss, and only when not offline, does the
//! hub client download the file (into the same cache).

use anyhow::{Context, Result, anyhow, bail};
use std::path::{Path, PathBuf};

/// Where the hub cache is, whether the network may be used, and which endpoint to use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubAccess {
    /// The hub cache directory (the folder that holds `models--*` / `datasets--*`).
    pub cache_dir: PathBuf,
    /// Never touch the network: a cache miss is an error.
    pub offline: bool,
    /// The hub endpoint (default `https://huggingface.co`).
    pub endpoint: Option<String>,
    /// An access token for gated or private repositories.
    pub token: Option<String>,
}

/// Whether an environment value switches a flag on (`1`, `true`, `yes`, `on`, any case), as the
/// Python hub client reads `HF_HUB_OFFLINE`.
fn truthy(v: &str) -> bool {
    matches!(
        v.trim().to_ascii_lowercase().as_str(),
        "1" | "true" | "yes" | "on"
    )
}

/// `p` with a leading `~` (alone or before a path separator) replaced by `home`, as Python's
/// `os.path.expanduser` does; other paths (and `~user`) unchanged, as is `p` without a home.
fn expand_home(p: &str, home: Option<&str>) -> PathBuf {
    match (p.strip_prefix('~'), home) {
        (Some(rest), Some(home))
            if rest.is_empty() || rest.starts_with(std::path::is_separator) =>
        {
            PathBuf::from(home).join(rest.trim_start_matches(std::path::is_separator))
        }
        _ => PathBuf::from(p),
    }
}

/// How many times a download that breaks off is resumed (hf-hub waits longer before each).
const DOWNLOAD_RETRIES: usize = 5;

impl HubAccess {
    /// Read the settings from variables given by `get` (the environment in [`HubAccess::from_env`])
    /// with the precedence of the Python hub client: cache `HF_HUB_CACHE`, else the legacy
    /// `HUGGINGFACE_HUB_CACHE`, else `<HF_HOME>/hub`, where HF_HOME defaults to
    /// `$XDG_CACHE_HOME/huggingface`, else `$HOME/.cache/huggingface`; a leading `~` in any of
    /// these is `$HOME`. Offline when `HF_HUB_OFFLINE` is truthy, or when it is unset and the
    /// legacy `TRANSFORMERS_OFFLINE` is. `HF_ENDPOINT`; token `HF_TOKEN`. Empty values count as
    /// unset.
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Self {
        let nonempty = |k: &str| get(k).filter(|v| !v.trim().is_empty());
        let home = nonempty("HOME");
        let expand = |p: String| expand_home(&p, home.as_deref());
        let cache_dir = if let Some(p) =
            nonempty("HF_HUB_CACHE").or_else(|| nonempty("HUGGINGFACE_HUB_CACHE"))
        {
            expand(p)
        } else {
            let hf_home = match nonempty("HF_HOME") {
                Some(p) => expand(p),
                None => nonempty("XDG_CACHE_HOME")
                    .map(expand)
                    .unwrap_or_else(|| PathBuf::from(home.as_deref().unwrap_or(".")).join(".cache"))
                    .join("huggingface"),
            };
            hf_home.join("hub")
        };
        let offline = nonempty("HF_HUB_OFFLINE").or_else(|| nonempty("TRANSFORMERS_OFFLINE"));
        Self {
            cache_dir,
            offline: offline.is_some_and(|v| truthy(&v)),
            endpoint: nonempty("HF_ENDPOINT"),
            token: nonempty("HF_TOKEN"),
        }
    }

    /// The settings of the process environment.
    pub fn from_env() -> Self {
        Self::from_vars(|k| std::env::var(k).ok())
    }

    /// Offline access to a given cache directory (tests, air-gapped machines).
    pub fn offline_cache(cache_dir: impl Into<PathBuf>) -> Self {
        Self {
            cache_dir: cache_dir.into(),
            offline: true,
            endpoint: None,
            token: None,
        }
    }

    fn describe(repo: &hf_hub::Repo) -> String {
        format!("{} (revision {})", repo.folder_name(), repo.revision())
    }

    /// The snapshot folder of `repo` in the cache, if its revision resolves there: a revision
    /// that is a full commit hash names its snapshot directly, any other revision (a branch, a
    /// tag, `refs/convert/parquet`) goes through `refs/<revision>`, whose content is trimmed
    /// (hf-hub 0.4's own `Cache::get` does not trim, so a ref written with a trailing newline
    /// would otherwise never resolve).
    pub fn snapshot_dir(&self, repo: &hf_hub::Repo) -> Option<PathBuf> {
        let root = self.cache_dir.join(repo.folder_name());
        let rev = repo.revision();
        let is_commit = rev.len() == 40 && rev.bytes().all(|b| b.is_ascii_hexdigit());
        let commit = if is_commit {
            rev.to_string()
        } else {
            let text = std::fs::read_to_string(root.join("refs").join(rev)).ok()?;
            let text = text.trim().to_string();
            if text.is_empty() || text.contains(['/', '\\']) || text == ".." {
                return None;
            }
            text
        };
        let dir = root.join("snapshots").join(commit);
        dir.is_dir().then_some(dir)
    }

    /// `file` of `repo` if the cache holds it (no network).
    pub fn cached_file(&self, repo: &hf_hub::Repo, file: &str) -> Option<PathBuf> {
        let p = self.snapshot_dir(repo)?.join(file);
        // `exists` follows the blob symlink: a dangling link is a miss.
        p.exists().then_some(p)
    }

    /// The hub client's settings: this cache, endpoint and token; an interrupted download is
    /// resumed up to [`DOWNLOAD_RETRIES`] times; a progress bar when `progress`.
    fn api_builder(&self, progress: bool) -> hf_hub::api::sync::ApiBuilder {
        let mut b = hf_hub::api::sync::ApiBuilder::from_env()
            .with_cache_dir(self.cache_dir.clone())
            .with_retries(DOWNLOAD_RETRIES)
            .with_progress(progress);
        if let Some(e) = &self.endpoint {
            b = b.with_endpoint(e.clone());
        }
        if self.token.is_some() {
            b = b.with_token(self.token.clone());
        }
        b
    }

    /// The hub client, with a progress bar only when stderr is a terminal (not in logs).
    fn api(&self) -> Result<hf_hub::api::sync::Api> {
        use std::io::IsTerminal;
        self.api_builder(std::io::stderr().is_terminal())
            .build()
            .context("cannot start the hub client")
    }

    /// Fetch `file` of `repo`: from the cache if present, else through the hub API (which
    /// stores it in the same cache). Offline, a cache miss is an error naming the cache.
    pub fn file(&self, repo: &hf_hub::Repo, file: &str) -> Result<PathBuf> {
        if let Some(p) = self.cached_file(repo, file) {
            return Ok(p);
        }
        if self.offline {
            bail!(
                "{file} of {} is not in the hub cache {} and offline mode is on \
                 (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE)",
                Self::describe(repo),
                self.cache_dir.display()
            );
        }
        self.api()?
            .repo(repo.clone())
            .get(file)
            .with_context(|| format!("cannot download {file} of {}", Self::describe(repo)))
    }

    /// The files of `repo` under the folder `dir` (a path inside the repository, no trailing
    /// slash) whose names end with `suffix`, sorted by path. Cache first: if the cached snapshot
    /// has such files, they are the answer and the network is not used; otherwise (and not
    /// offline) the hub's file listing of that revision is asked.
    ///
    /// A cached snapshot is taken as complete: if an earlier download was interrupted between
    /// two shards, delete the snapshot folder (or the repo's cache folder) and fetch again.
    pub fn list_files(&self, repo: &hf_hub::Repo, dir: &str, suffix: &str) -> Result<Vec<String>> {
        let dir = dir.trim_matches('/');
        if let Some(snap) = self.snapshot_dir(repo) {
            let found = list_dir(&snap, dir, suffix)?;
            if !found.is_empty() {
                return Ok(found);
            }
        }
        if self.offline {
            bail!(
                "no {suffix} files under {dir}/ of {} in the hub cache {} and offline mode is on \
                 (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE)",
                Self::describe(repo),
                self.cache_dir.display()
            );
        }
        let info = self
            .api()?
            .repo(repo.clone())
            .info()
            .with_context(|| format!("cannot list the files of {}", Self::describe(repo)))?;
        let prefix = format!("{dir}/");
        let mut all: Vec<String> = info.siblings.into_iter().map(|s| s.rfilename).collect();
        all.sort();
        let found: Vec<String> = all
            .iter()
            .filter(|f| {
                f.strip_prefix(&prefix)
                    .is_some_and(|rest| !rest.contains('/') && rest.ends_with(suffix))
            })
            .cloned()
            .collect();
        if found.is_empty() {
            let top: Vec<&str> = all.iter().take(20).map(String::as_str).collect();
            bail!(
                "{} has no {suffix} files under {dir}/ (its files include: {})",
                Self::describe(repo),
                if top.is_empty() {
                    "none".to_string()
                } else {
                    top.join(", ")
                }
            );
        }
        Ok(found)
    }
}

/// Files directly under `root/dir` ending with `suffix`, as repo-relative paths, sorted.
fn list_dir(root: &Path, dir: &str, suffix: &str) -> Result<Vec<String>> {
    let folder = root.join(dir);
    if !folder.is_dir() {
        return Ok(vec![]);
    }
    let mut out = Vec::new();
    for entry in
        std::fs::read_dir(&folder).with_context(|| format!("cannot list {}", folder.display()))?
    {
        let entry = entry?;
        let name = entry
            .file_name()
            .into_string()
            .map_err(|n| anyhow!("{}: file name {n:?} is not UTF-8", folder.display()))?;
        if name.ends_with(suffix) && entry.path().is_file() {
            out.push(format!("{dir}/{name}"));
        }
    }
    out.sort();
    Ok(out)
}

/// The hub cache directory of the environment (see [`HubAccess::from_vars`]).
pub fn hub_cache_dir() -> PathBuf {
    HubAccess::from_env().cache_dir
}

/// Fetch `file` of a hub repo with the environment's settings (see [`HubAccess::file`]).
pub fn hub_file(repo: &hf_hub::Repo, file: &str) -> Result<PathBuf> {
    HubAccess::from_env().file(repo, file)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn vars(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| m.get(k).cloned()
    }

    #[test]
    fn settings_follow_the_hub_variables() {
        let a = HubAccess::from_vars(vars(&[
            ("HF_HUB_CACHE", "/c"),
            ("HF_HOME", "/h"),
            ("HF_HUB_OFFLINE", "1"),
        ]));
        assert_eq!(a.cache_dir, PathBuf::from("/c"));
        assert!(a.offline);
        let a = HubAccess::from_vars(vars(&[("HF_HOME", "/h"), ("HF_HUB_OFFLINE", "0")]));
        assert_eq!(a.cache_dir, PathBuf::from("/h/hub"));
        assert!(!a.offline);
        let a = HubAccess::from_vars(vars(&[("HOME", "/u"), ("HF_HUB_OFFLINE", "True")]));
        assert_eq!(a.cache_dir, PathBuf::from("/u/.cache/huggingface/hub"));
        assert!(a.offline);
        assert!(!HubAccess::from_vars(vars(&[])).offline);
    }

    #[test]
    fn cache_precedence_follows_the_python_client() {
        let cache = |pairs: &[(&str, &str)]| HubAccess::from_vars(vars(pairs)).cache_dir;
        let all = [
            ("HOME", "/u"),
            ("XDG_CACHE_HOME", "/x"),
            ("HF_HOME", "/h"),
            ("HUGGINGFACE_HUB_CACHE", "/legacy"),
            ("HF_HUB_CACHE", "/c"),
        ];
        // Each variable wins over those before it; empty values count as unset.
        let want = [
            "/u/.cache/huggingface/hub",
            "/x/huggingface/hub",
            "/h/hub",
            "/legacy",
            "/c",
        ];
        for (n, want) in want.iter().enumerate() {
            assert_eq!(cache(&all[..=n]), PathBuf::from(want), "{:?}", &all[..=n]);
            let mut emptied = all.to_vec();
            emptied[n + 1..].iter_mut().for_each(|kv| kv.1 = "");
            assert_eq!(cache(&emptied), PathBuf::from(want), "{emptied:?}");
        }
        // A leading `~` is $HOME in every one of them; `~user` and inner `~` are left alone.
        let home = ("HOME", "/u");
        assert_eq!(cache(&[home, ("HF_HUB_CACHE", "~")]), PathBuf::from("/u"));
        assert_eq!(
            cache(&[home, ("HUGGINGFACE_HUB_CACHE", "~/l")]),
            PathBuf::from("/u/l")
        );
        assert_eq!(
            cache(&[home, ("HF_HOME", "~/h")]),
            PathBuf::from("/u/h/hub")
        );
        assert_eq!(
            cache(&[home, ("XDG_CACHE_HOME", "~/x")]),
            PathBuf::from("/u/x/huggingface/hub")
        );
        assert_eq!(
            cache(&[home, ("HF_HUB_CACHE", "~bob/c")]),
            PathBuf::from("~bob/c")
        );
        assert_eq!(
            cache(&[home, ("HF_HUB_CACHE", "/a/~/c")]),
            PathBuf::from("/a/~/c")
        );
    }

    #[test]
    fn transformers_offline_counts_only_when_hf_hub_offline_is_unset() {
        let offline = |pairs: &[(&str, &str)]| HubAccess::from_vars(vars(pairs)).offline;
        assert!(offline(&[("TRANSFORMERS_OFFLINE", "1")]));
        assert!(offline(&[
            ("HF_HUB_OFFLINE", ""),
            ("TRANSFORMERS_OFFLINE", "yes")
        ]));
        assert!(!offline(&[("TRANSFORMERS_OFFLINE", "0")]));
        // As in the Python client, a set HF_HUB_OFFLINE decides alone.
        assert!(!offline(&[
            ("HF_HUB_OFFLINE", "0"),
            ("TRANSFORMERS_OFFLINE", "1")
        ]));
        assert!(offline(&[
            ("HF_HUB_OFFLINE", "1"),
            ("TRANSFORMERS_OFFLINE", "0")
        ]));
    }

    #[test]
    fn downloads_are_resumed_and_show_progress_only_when_asked() {
        // hf-hub 0.4.3 has no getters; its builder's Debug output shows the settings.
        let access = HubAccess::offline_cache("/c");
        for progress in [false, true] {
            let b = format!("{:?}", access.api_builder(progress));
            assert!(
                b.contains(&format!("max_retries: {DOWNLOAD_RETRIES},")),
                "{b}"
            );
            assert!(b.contains(&format!("progress: {progress},")), "{b}");
        }
        assert!(!format!("{:?}", access.api_builder(false)).contains("max_retries: 0,"));
    }

    #[test]
    fn revisions_resolve_through_refs_including_slashes() {
        let tmp = tempfile::tempdir().unwrap();
        let hash = "0123456789abcdef0123456789abcdef01234567";
        let root = tmp.path().join("datasets--org--name");
        std::fs::create_dir_all(root.join("refs/refs/convert")).unwrap();
        // A trailing newline (as some tools write) must not break resolution.
        std::fs::write(root.join("refs/refs/convert/parquet"), format!("{hash}\n")).unwrap();
        let snap = root.join("snapshots").join(hash).join("cfg/train");
        std::fs::create_dir_all(&snap).unwrap();
        std::fs::write(snap.join("0001.parquet"), b"x").unwrap();
        std::fs::write(snap.join("0000.parquet"), b"x").unwrap();
        std::fs::write(snap.join("notes.txt"), b"x").unwrap();
        let access = HubAccess::offline_cache(tmp.path());
        let repo = |rev: &str| {
            hf_hub::Repo::with_revision("org/name".into(), hf_hub::RepoType::Dataset, rev.into())
        };
        let r = repo("refs/convert/parquet");
        assert_eq!(
            access.list_files(&r, "cfg/train", ".parquet").unwrap(),
            vec!["cfg/train/0000.parquet", "cfg/train/0001.parquet"]
        );
        assert!(access.file(&r, "cfg/train/0000.parquet").is_ok());
        // A full commit hash names its snapshot directly.
        assert!(access.file(&repo(hash), "cfg/train/0001.parquet").is_ok());
        // Misses are errors that name the file, the repo and the cache.
        let e = format!(
            "{:#}",
            access.file(&r, "cfg/test/0000.parquet").unwrap_err()
        );
        assert!(
            e.contains("cfg/test/0000.parquet") && e.contains("datasets--org--name"),
            "{e}"
        );
        let e = format!(
            "{:#}",
            access
                .list_files(&repo("main"), "cfg/train", ".parquet")
                .unwrap_err()
        );
        assert!(e.contains("revision main") && e.contains("offline"), "{e}");
    }
}
