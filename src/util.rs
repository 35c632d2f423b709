//! Small shared helpers: atomic file writes, JSON-lines reading with line numbers, hashing.

use anyhow::{Context, Result, anyhow};
use serde::de::DeserializeOwned;
use sha2::{Digest, Sha256};
use std::fs::File;
use std::io::{BufRead, BufWriter, Write};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

/// A name suffix unique to this process and call: `PID.N`, for temporary files and folders
/// that several processes (or threads) may create side by side in one directory.
pub fn unique_suffix() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    format!(
        "{}.{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

#[cfg(test)]
type SyncHook = Box<dyn FnMut(&Path, bool) -> std::io::Result<()>>;

#[cfg(test)]
thread_local! {
    /// Tests only: called before every fsync of this thread with (path, is_directory); an error
    /// it returns stands for the fsync's.
    static SYNC_HOOK: std::cell::RefCell<Option<SyncHook>> = const { std::cell::RefCell::new(None) };
}

/// Tests only: install (or, with None, remove) this thread's fsync hook.
#[cfg(test)]
pub(crate) fn set_sync_hook(hook: Option<SyncHook>) {
    SYNC_HOOK.with(|h| *h.borrow_mut() = hook);
}

fn sync_hook(_path: &Path, _is_dir: bool) -> std::io::Result<()> {
    #[cfg(test)]
    if let Some(h) = SYNC_HOOK.with(|h| h.borrow_mut().take()) {
        let mut h = h;
        let r = h(_path, _is_dir);
        SYNC_HOOK.with(|slot| *slot.borrow_mut() = Some(h));
        return r;
    }
    Ok(())
}

/// fsync an open file (data and metadata). An error is returned with the path: on NFS a quota
/// or disk-full error may surface only here.
pub fn sync_file(f: &File, path: &Path) -> Result<()> {
    sync_hook(path, false)
        .and_then(|()| f.sync_all())
        .with_context(|| format!("cannot sync {} to disk", path.display()))
}

/// fsync a directory, so that the entries created or renamed in it are durable. File systems
/// that do not support syncing a directory (EINVAL, ENOTSUP) are ignored; other errors are
/// returned with the path. A no-op where directories cannot be opened (not Unix).
pub fn sync_dir(dir: &Path) -> Result<()> {
    #[cfg(unix)]
    {
        let r = sync_hook(dir, true).and_then(|()| File::open(dir)?.sync_all());
        match r {
            Ok(()) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::InvalidInput | std::io::ErrorKind::Unsupported
                ) => {}
            Err(e) => {
                return Err(e).with_context(|| format!("cannot sync directory {}", dir.display()));
            }
        }
    }
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

/// The directory holding `path` (`.` for a bare file name).
fn parent_dir(path: &Path) -> &Path {
    path.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

/// Write `bytes` to `path` atomically: a temporary file in the same directory, fsync, rename,
/// fsync of the directory. A reader never sees a half-written file, and a crash leaves the old
/// content intact.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_with(path, |w| Ok(w.write_all(bytes)?))
}

/// Like [`write_atomic`], with the content streamed by `write` into a buffered temporary file
/// (it need not be held in memory at once). If `write` or any step fails, the temporary file is
/// removed and `path` is left as it was.
pub fn write_atomic_with(
    path: &Path,
    write: impl FnOnce(&mut BufWriter<File>) -> Result<()>,
) -> Result<()> {
    let dir = parent_dir(path);
    std::fs::create_dir_all(dir)
        .with_context(|| format!("cannot create directory {}", dir.display()))?;
    let name = path
        .file_name()
        .ok_or_else(|| anyhow!("{} has no file name", path.display()))?
        .to_string_lossy();
    let tmp = dir.join(format!(".{name}.tmp.{}", unique_suffix()));
    let r = (|| -> Result<()> {
        let f = File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
        let mut w = BufWriter::with_capacity(1 << 20, f);
        write(&mut w).with_context(|| format!("cannot write {}", tmp.display()))?;
        let f = w
            .into_inner()
            .map_err(|e| e.into_error())
            .with_context(|| format!("cannot write {}", tmp.display()))?;
        sync_file(&f, &tmp)?;
        drop(f);
        std::fs::rename(&tmp, path)
            .with_context(|| format!("cannot move {} to {}", tmp.display(), path.display()))
    })();
    if r.is_err() {
        std::fs::remove_file(&tmp).ok();
    }
    r?;
    sync_dir(dir)
}

/// Read a JSON-lines file into records of type `T`. Blank lines are skipped; a line that is not
/// valid JSON or lacks a field is an error naming the file and the line number (1-based).
pub fn read_jsonl<T: DeserializeOwned>(path: &Path) -> Result<Vec<T>> {
    Ok(read_jsonl_numbered(path)?
        .into_iter()
        .map(|(_, r)| r)
        .collect())
}

/// [`read_jsonl`], each record with its physical line number (1-based, blank lines counted, as
/// an editor shows it), for later errors that name the line.
pub fn read_jsonl_numbered<T: DeserializeOwned>(path: &Path) -> Result<Vec<(usize, T)>> {
    let f = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut out = Vec::new();
    for (i, line) in std::io::BufReader::new(f).lines().enumerate() {
        let line =
            line.with_context(|| format!("{}: line {}: cannot read", path.display(), i + 1))?;
        if line.trim().is_empty() {
            continue;
        }
        let rec = serde_json::from_str(&line)
            .map_err(|e| anyhow!("{}: line {}: {e}", path.display(), i + 1))?;
        out.push((i + 1, rec));
    }
    Ok(out)
}

/// Serialize records as JSON lines.
pub fn to_jsonl<T: serde::Serialize>(records: &[T]) -> Result<String> {
    let mut s = String::new();
    for r in records {
        s.push_str(&serde_json::to_string(r)?);
        s.push('\n');
    }
    Ok(s)
}

/// Hex SHA-256 of some bytes.
pub fn sha256_hex(bytes: &[u8]) -> String {
    let mut h = Sha256::new();
    h.update(bytes);
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// An incremental hasher over several pieces (e.g. tensors and data).
#[derive(Default)]
pub struct Hasher(Sha256);

impl Hasher {
    pub fn new() -> Self {
        Self(Sha256::new())
    }
    pub fn update(&mut self, bytes: &[u8]) {
        self.0.update((bytes.len() as u64).to_le_bytes());
        self.0.update(bytes);
    }
    pub fn hex(self) -> String {
        self.0
            .finalize()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }
}

/// Make the C allocator keep freed memory for reuse instead of handing every large free back to
/// the OS. Training on the CPU allocates and frees many short-lived buffers of the same sizes
/// (one per tensor op and gradient); with glibc's defaults each one is a fresh `mmap` that the
/// kernel zero-fills page by page, which cost about a fifth of a DPO step. Call it once, first
/// thing in `main`. A no-op except on Linux with glibc.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; called before other threads start.
    unsafe {
        // Requests below 32 MiB (glibc's maximum) come from the heap, which is trimmed only
        // when 1 GiB is free at its top.
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TOP_PAD, 16 << 20);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize, Debug)]
    #[allow(dead_code)]
    struct Rec {
        a: u32,
    }

    #[test]
    fn jsonl_errors_name_line() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("x.jsonl");
        std::fs::write(&p, "{\"a\": 1}\n\n{\"a\": 2}\n{\"b\": 3}\n").unwrap();
        let e = read_jsonl::<Rec>(&p).unwrap_err().to_string();
        assert!(e.contains("x.jsonl: line 4"), "{e}");
        std::fs::write(&p, "{\"a\": 1}\nnot json\n").unwrap();
        let e = read_jsonl::<Rec>(&p).unwrap_err().to_string();
        assert!(e.contains("line 2"), "{e}");
    }

    #[test]
    fn atomic_write_replaces() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("sub/out.txt");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "two");
        assert_eq!(std::fs::read_dir(p.parent().unwrap()).unwrap().count(), 1);
    }

    #[test]
    fn concurrent_atomic_writes_of_one_file_do_not_collide() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("out.txt");
        std::thread::scope(|s| {
            for t in 0..6 {
                let p = &p;
                s.spawn(move || {
                    for i in 0..40 {
                        write_atomic(p, format!("{t} {i}").as_bytes()).unwrap();
                    }
                });
            }
        });
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 1);
    }

    #[test]
    fn atomic_write_syncs_the_file_then_the_folder_and_reports_sync_errors() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("out.txt");
        let seen = std::rc::Rc::new(std::cell::RefCell::new(vec![]));
        let log = seen.clone();
        set_sync_hook(Some(Box::new(move |path, is_dir| {
            log.borrow_mut().push((path.to_path_buf(), is_dir));
            Ok(())
        })));
        write_atomic(&p, b"one").unwrap();
        let seen = seen.borrow().clone();
        assert_eq!(seen.len(), 2, "{seen:?}");
        assert!(
            !seen[0].1 && seen[0].0.parent() == Some(d.path()),
            "{seen:?}"
        );
        assert_eq!(seen[1], (d.path().to_path_buf(), true));
        // An fsync error (a quota error on NFS) fails the write, names the file, and leaves the
        // old content and no temporary file.
        set_sync_hook(Some(Box::new(|_, is_dir| {
            if is_dir {
                Ok(())
            } else {
                Err(std::io::Error::other("Disk quota exceeded"))
            }
        })));
        let e = format!("{:#}", write_atomic(&p, b"two").unwrap_err());
        assert!(e.contains("out.txt") && e.contains("quota"), "{e}");
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "one");
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 1);
        // A folder's fsync: EINVAL (not supported there) is ignored, other errors are not.
        set_sync_hook(Some(Box::new(|_, is_dir| {
            if is_dir {
                Err(std::io::Error::from(std::io::ErrorKind::InvalidInput))
            } else {
                Ok(())
            }
        })));
        write_atomic(&p, b"three").unwrap();
        set_sync_hook(Some(Box::new(|_, is_dir| {
            if is_dir {
                Err(std::io::Error::other("I/O error"))
            } else {
                Ok(())
            }
        })));
        let e = format!("{:#}", write_atomic(&p, b"four").unwrap_err());
        assert!(e.contains(&d.path().display().to_string()), "{e}");
        set_sync_hook(None);
    }
}
