//! Where a training step's time goes on its device: named sections of the step, each timed
//! between two device synchronisations (`overopt-gpu-bench --profile`).
//!
//! Off by default, when a section costs one atomic load. When on, [`section`] waits for the
//! device to finish the work queued before it, runs its closure, waits again and adds the
//! elapsed time to its name. Sections nest: a section's time is its own (exclusive), the time
//! of the sections inside it is subtracted, so the times of all names add up to the time of
//! the outermost sections. A CUDA device runs asynchronously; without the waits a section
//! would measure only the host's time to queue its kernels. With them, the profiled step is
//! slower than an unprofiled one by the synchronisations (tens of microseconds each on a GPU)
//! and the lost overlap of host and device: compare shares, not the sum, with the step time.
//!
//! The table is global (one step is profiled at a time); sections on several threads at once
//! keep their nesting per thread.
//!
//! A program that counts its allocations (the benchmark's counting allocator) can hand
//! [`set_counter`] a reading of its count of buffers and bytes allocated so far: each
//! section then also records what it allocated itself. On the CPU, where every tensor op
//! writes a new buffer, that is what the section writes; with the real shapes, what its
//! GPU kernels would write.

use candle_core::Device;
use std::cell::RefCell;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

static ON: AtomicBool = AtomicBool::new(false);
static TABLE: Mutex<Vec<Section>> = Mutex::new(Vec::new());
static COUNTER: Mutex<Option<fn() -> Allocated>> = Mutex::new(None);

thread_local! {
    /// Per open section of this thread: what the sections closed inside it took.
    static OPEN: RefCell<Vec<Usage>> = const { RefCell::new(Vec::new()) };
}

/// Buffers and bytes allocated so far (a running count; see [`set_counter`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Allocated {
    pub buffers: u64,
    pub bytes: u64,
}

#[derive(Debug, Clone, Copy, Default)]
struct Usage {
    time: Duration,
    alloc: Allocated,
}

/// One name's totals: its own time and allocations (nested sections excluded) and how often
/// it ran. `allocated` stays zero without a counter.
#[derive(Debug, Clone, PartialEq)]
pub struct Section {
    pub name: &'static str,
    pub time: Duration,
    pub allocated: Allocated,
    pub calls: u64,
}

/// Count each section's allocations with `counter`, a reading of the program's running count
/// of buffers and bytes allocated (it must not decrease).
pub fn set_counter(counter: fn() -> Allocated) {
    *COUNTER.lock().unwrap_or_else(|e| e.into_inner()) = Some(counter);
}

fn allocated() -> Allocated {
    let counter = *COUNTER.lock().unwrap_or_else(|e| e.into_inner());
    counter.map(|c| c()).unwrap_or_default()
}

/// Turn the profile on or off (the table is kept; see [`take`]).
pub fn set_enabled(on: bool) {
    ON.store(on, Ordering::SeqCst);
}

pub fn enabled() -> bool {
    ON.load(Ordering::Relaxed)
}

/// Run `f` as the section `name` on `dev` (see the module docs). When the profile is off this
/// is `f()`. An error of `f` or of a synchronisation is returned and nothing is recorded.
pub fn section<T, E: From<candle_core::Error>>(
    name: &'static str,
    dev: &Device,
    f: impl FnOnce() -> Result<T, E>,
) -> Result<T, E> {
    if !enabled() {
        return f();
    }
    timed(name, dev, Instant::now, f)
}

/// [`section`] with the clock `now`.
fn timed<T, E: From<candle_core::Error>>(
    name: &'static str,
    dev: &Device,
    now: impl Fn() -> Instant,
    f: impl FnOnce() -> Result<T, E>,
) -> Result<T, E> {
    dev.synchronize()?;
    OPEN.with(|o| o.borrow_mut().push(Usage::default()));
    let (t0, a0) = (now(), allocated());
    let out = f().and_then(|v| {
        dev.synchronize()?;
        Ok(v)
    });
    let (t1, a1) = (now(), allocated());
    let total = Usage {
        time: t1 - t0,
        alloc: Allocated {
            buffers: a1.buffers.saturating_sub(a0.buffers),
            bytes: a1.bytes.saturating_sub(a0.bytes),
        },
    };
    let inner = OPEN.with(|o| {
        let mut o = o.borrow_mut();
        let inner = o.pop().unwrap_or_default();
        if let Some(parent) = o.last_mut() {
            parent.time += total.time;
            parent.alloc.buffers += total.alloc.buffers;
            parent.alloc.bytes += total.alloc.bytes;
        }
        inner
    });
    let v = out?;
    record(
        name,
        Usage {
            time: total.time.saturating_sub(inner.time),
            alloc: Allocated {
                buffers: total.alloc.buffers.saturating_sub(inner.alloc.buffers),
                bytes: total.alloc.bytes.saturating_sub(inner.alloc.bytes),
            },
        },
    );
    Ok(v)
}

fn record(name: &'static str, own: Usage) {
    let mut t = TABLE.lock().unwrap_or_else(|e| e.into_inner());
    match t.iter_mut().find(|s| s.name == name) {
        Some(s) => {
            s.time += own.time;
            s.allocated.buffers += own.alloc.buffers;
            s.allocated.bytes += own.alloc.bytes;
            s.calls += 1;
        }
        None => t.push(Section {
            name,
            time: own.time,
            allocated: own.alloc,
            calls: 1,
        }),
    }
}

/// The sections recorded since the last call, most time first; empties the table.
pub fn take() -> Vec<Section> {
    let mut t = std::mem::take(&mut *TABLE.lock().unwrap_or_else(|e| e.into_inner()));
    t.sort_by(|a, b| b.time.cmp(&a.time).then(a.name.cmp(b.name)));
    t
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    thread_local! {
        static FAKE_MS: Cell<u64> = const { Cell::new(0) };
    }

    /// A section on a clock that moves only by `advance`.
    fn fake<T>(
        name: &'static str,
        f: impl FnOnce() -> candle_core::Result<T>,
    ) -> candle_core::Result<T> {
        let base = Instant::now();
        let now = move || base + Duration::from_millis(FAKE_MS.with(|c| c.get()));
        timed(name, &Device::Cpu, now, f)
    }

    fn advance(ms: u64) {
        FAKE_MS.with(|c| c.set(c.get() + ms));
    }

    static FAKE_BYTES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

    /// A buffer of `bytes` counted by the fake counter.
    fn alloc(bytes: u64) {
        FAKE_BYTES.fetch_add(bytes, Ordering::SeqCst);
    }

    fn fake_counter() -> Allocated {
        let bytes = FAKE_BYTES.load(Ordering::SeqCst);
        // Buffers of 1000 bytes each.
        Allocated {
            buffers: bytes / 1000,
            bytes,
        }
    }

    #[test]
    fn nested_sections_count_their_own_time() {
        // The only test that reads the global table and sets a counter.
        set_counter(fake_counter);
        let r = fake("test.outer", || {
            advance(20);
            alloc(5000);
            for _ in 0..2 {
                fake("test.inner", || {
                    advance(15);
                    alloc(2000);
                    fake("test.innermost", || {
                        advance(1);
                        alloc(1000);
                        Ok(())
                    })
                })?;
            }
            advance(3);
            Ok(7)
        });
        assert_eq!(r.unwrap(), 7);
        let failed: candle_core::Result<()> = fake("test.failed", || {
            advance(100);
            candle_core::bail!("no")
        });
        assert!(failed.is_err());
        // After a failed section the nesting is intact: a new outermost section.
        fake("test.after", || {
            advance(4);
            Ok(())
        })
        .unwrap();
        let t = take();
        let get = |n: &str| {
            t.iter()
                .find(|s| s.name == n)
                .map(|s| (s.time.as_millis(), s.allocated.bytes, s.calls))
        };
        assert_eq!(get("test.outer"), Some((23, 5000, 1)));
        assert_eq!(get("test.inner"), Some((30, 4000, 2)));
        assert_eq!(get("test.innermost"), Some((2, 2000, 2)));
        assert_eq!(get("test.after"), Some((4, 0, 1)));
        let outer = t.iter().find(|s| s.name == "test.outer").unwrap();
        assert_eq!(outer.allocated.buffers, 5);
        assert_eq!(get("test.failed"), None, "a failed section is not recorded");
        OPEN.with(|o| assert!(o.borrow().is_empty()));
        // Off (the default; no other test of the crate turns it on): nothing is recorded.
        let r = section("test.off", &Device::Cpu, || Ok::<_, candle_core::Error>(5));
        assert_eq!(r.unwrap(), 5);
        assert!(take().iter().all(|s| s.name != "test.off"));
    }
}
