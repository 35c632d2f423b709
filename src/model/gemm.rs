//! Single-precision matrix products for the CPU paths (training, scoring and sampling).
//!
//! candle's CPU matmul calls the `gemm` crate, which reaches about a third of this kind of
//! core's f32 peak on the teach models' shapes (docs/perf.md: ~45 GFLOP/s where PyTorch's
//! oneDNN/MKL reaches ~140 on one thread). This module is a classic packed product:
//!
//! - `B` is packed per block of `KC` rows into panels of `nr` columns (zero-padded), so that
//!   one panel stays in L1 while it is used;
//! - `A` is packed per block of `MC` rows into micro-panels of `mr` rows, k-major;
//! - a register-tiled micro-kernel computes an `mr x nr` tile of `C` from one A micro-panel
//!   and one B panel: AVX-512 (12 x 32), AVX2 + FMA (6 x 16), or portable Rust (4 x 8),
//!   chosen at run time from the CPU's features.
//!
//! Any strides are accepted for `A` and `B` (transposed views need no copy: the packing reads
//! them); `C` is a contiguous row-major buffer. Row blocks of `C` run in parallel on rayon's
//! pool when the product is large enough. Each element of `C` is summed by one thread in a
//! fixed order, so results do not depend on the thread count.

use rayon::prelude::*;
use std::sync::OnceLock;

/// A read-only matrix view: element (i, j) is `data[i * rs + j * cs]`.
#[derive(Clone, Copy, Debug)]
pub struct MatRef<'a> {
    pub data: &'a [f32],
    pub rows: usize,
    pub cols: usize,
    pub rs: usize,
    pub cs: usize,
}

impl<'a> MatRef<'a> {
    /// A contiguous row-major (rows, cols) matrix.
    pub fn row_major(data: &'a [f32], rows: usize, cols: usize) -> Self {
        Self {
            data,
            rows,
            cols,
            rs: cols,
            cs: 1,
        }
    }

    /// The transpose, as a view (no copy).
    pub fn t(self) -> Self {
        Self {
            data: self.data,
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
        }
    }

    fn in_bounds(&self) -> bool {
        self.rows == 0
            || self.cols == 0
            || (self.rows - 1) * self.rs + (self.cols - 1) * self.cs < self.data.len()
    }
}

/// Rows of `A` packed per block (a multiple of every kernel's `mr`).
const MC: usize = 96;
/// Depth of one packed block.
const KC: usize = 512;
/// Below this many multiply-adds a product runs on the calling thread.
const PAR_MIN_FLOP: usize = 1 << 17;

/// `c[i*ldc + j] (+)= sum_p a[p*mr + i] * b[p*nr + j]` for a full mr x nr tile.
type MicroKernel =
    unsafe fn(kc: usize, a: *const f32, b: *const f32, c: *mut f32, ldc: usize, acc: bool);

#[derive(Clone, Copy)]
struct Kernel {
    mr: usize,
    nr: usize,
    run: MicroKernel,
    name: &'static str,
}

/// The instruction sets this module can use, best first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    Avx512,
    Avx2,
    Portable,
}

impl Isa {
    /// Every kernel the running CPU supports, best first.
    pub fn available() -> &'static [Isa] {
        static AVAIL: OnceLock<Vec<Isa>> = OnceLock::new();
        AVAIL.get_or_init(Self::detect)
    }

    fn detect() -> Vec<Isa> {
        let mut v = Vec::new();
        #[cfg(target_arch = "x86_64")]
        {
            if std::is_x86_feature_detected!("avx512f") {
                v.push(Isa::Avx512);
            }
            if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                v.push(Isa::Avx2);
            }
        }
        v.push(Isa::Portable);
        v
    }

    fn kernel(self) -> Kernel {
        match self {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => Kernel {
                mr: 12,
                nr: 32,
                run: x86::avx512_12x32,
                name: "avx512 12x32",
            },
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => Kernel {
                mr: 6,
                nr: 16,
                run: x86::avx2_6x16,
                name: "avx2+fma 6x16",
            },
            _ => Kernel {
                mr: 4,
                nr: 8,
                run: portable_4x8,
                name: "portable 4x8",
            },
        }
    }
}

/// The instruction set used by [`sgemm`]: the best available, unless `OVEROPT_GEMM=avx2` or
/// `OVEROPT_GEMM=portable` asks for a lesser one (for A/B measurements).
pub fn default_isa() -> Isa {
    static ISA: OnceLock<Isa> = OnceLock::new();
    *ISA.get_or_init(|| {
        let avail = Isa::available();
        let wanted = match std::env::var("OVEROPT_GEMM").ok().as_deref() {
            Some("avx2") => Some(Isa::Avx2),
            Some("portable") => Some(Isa::Portable),
            _ => None,
        };
        wanted.filter(|w| avail.contains(w)).unwrap_or(avail[0])
    })
}

/// The threads the CPU kernels may use: candle's setting (RAYON_NUM_THREADS, else the CPUs),
/// read once per process (candle reads the environment on every call).
pub fn threads() -> usize {
    static N: OnceLock<usize> = OnceLock::new();
    *N.get_or_init(candle_core::utils::get_num_threads)
}

thread_local! {
    static SERIAL: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Run `f` with this module's products (and the per-row kernels that ask [`parallel_ok`])
/// on the calling thread only: for callers that already split their work over threads at a
/// coarser grain (e.g. sampling, one task per block of rows), where waking the pool for each
/// small product would cost more than it saves.
pub fn serial<R>(f: impl FnOnce() -> R) -> R {
    let before = SERIAL.with(|c| c.replace(true));
    let out = f();
    SERIAL.with(|c| c.set(before));
    out
}

/// True when the CPU kernels may split work over threads here: several threads are allowed
/// and the caller is not inside [`serial`].
pub fn parallel_ok() -> bool {
    threads() > 1 && !SERIAL.with(|c| c.get())
}

/// A short description of the kernel [`sgemm`] uses on this CPU.
pub fn kernel_name() -> &'static str {
    default_isa().kernel().name
}

/// `C = A B` (or `C += A B` with `accumulate`), `C` contiguous row-major (a.rows, b.cols).
pub fn sgemm(a: MatRef, b: MatRef, c: &mut [f32], accumulate: bool) {
    sgemm_isa(default_isa(), a, b, c, accumulate)
}

/// [`sgemm`] with a given instruction set (which the CPU must support: see [`Isa::available`]).
pub fn sgemm_isa(isa: Isa, a: MatRef, b: MatRef, c: &mut [f32], accumulate: bool) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    assert_eq!(b.rows, k, "sgemm: inner dimensions {k} and {}", b.rows);
    assert_eq!(c.len(), m * n, "sgemm: output of {} for {m} x {n}", c.len());
    assert!(a.in_bounds() && b.in_bounds(), "sgemm: view out of bounds");
    assert!(
        Isa::available().contains(&isa),
        "sgemm: {isa:?} is not supported here"
    );
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            c.fill(0.0);
        }
        return;
    }
    let kern = isa.kernel();
    let panels = n.div_ceil(kern.nr);
    let mut bpack = vec![0f32; panels * kern.nr * KC.min(k)];
    let parallel = parallel_ok() && m * n * k >= PAR_MIN_FLOP;
    for p0 in (0..k).step_by(KC) {
        let kc = KC.min(k - p0);
        pack_b(b, p0, kc, kern.nr, &mut bpack[..panels * kern.nr * kc]);
        let bp = &bpack[..panels * kern.nr * kc];
        let acc = accumulate || p0 > 0;
        let block =
            |(blk, cb): (usize, &mut [f32])| row_block(kern, a, bp, n, blk * MC, p0, kc, cb, acc);
        if parallel {
            c.par_chunks_mut(MC * n).enumerate().for_each(block);
        } else {
            c.chunks_mut(MC * n).enumerate().for_each(block);
        }
    }
}

/// One block of up to `MC` rows of `C` (`cb`, starting at row `i0`) for depth block `p0..p0+kc`.
#[allow(clippy::too_many_arguments)]
fn row_block(
    kern: Kernel,
    a: MatRef,
    bp: &[f32],
    n: usize,
    i0: usize,
    p0: usize,
    kc: usize,
    cb: &mut [f32],
    acc: bool,
) {
    let (mr, nr) = (kern.mr, kern.nr);
    let mc = cb.len() / n;
    let micro = mc.div_ceil(mr);
    let mut ap = vec![0f32; micro * mr * kc];
    pack_a(a, i0, mc, p0, kc, mr, &mut ap);
    let mut tile = [0f32; 12 * 32];
    for (jp, bpanel) in bp.chunks_exact(nr * kc).enumerate() {
        let j0 = jp * nr;
        let nr_eff = nr.min(n - j0);
        for ip in 0..micro {
            let r0 = ip * mr;
            let mr_eff = mr.min(mc - r0);
            let apanel = &ap[ip * mr * kc..(ip + 1) * mr * kc];
            if mr_eff == mr && nr_eff == nr {
                // SAFETY: the tile rows r0..r0+mr, columns j0..j0+nr lie inside `cb` (row
                // stride n), the panels hold kc*mr and kc*nr values, and the kernel's
                // instruction set was checked by `sgemm_isa`.
                unsafe {
                    (kern.run)(
                        kc,
                        apanel.as_ptr(),
                        bpanel.as_ptr(),
                        cb.as_mut_ptr().add(r0 * n + j0),
                        n,
                        acc,
                    )
                }
            } else {
                // Edge tile: compute the full tile into `tile`, then copy the valid part.
                for r in 0..mr_eff {
                    let src = &cb[(r0 + r) * n + j0..(r0 + r) * n + j0 + nr_eff];
                    if acc {
                        tile[r * nr..r * nr + nr_eff].copy_from_slice(src);
                    }
                }
                // SAFETY: `tile` holds mr x nr values with row stride nr (12 * 32 is the
                // largest tile); panels as above.
                unsafe {
                    (kern.run)(
                        kc,
                        apanel.as_ptr(),
                        bpanel.as_ptr(),
                        tile.as_mut_ptr(),
                        nr,
                        acc,
                    )
                }
                for r in 0..mr_eff {
                    cb[(r0 + r) * n + j0..(r0 + r) * n + j0 + nr_eff]
                        .copy_from_slice(&tile[r * nr..r * nr + nr_eff]);
                }
            }
        }
    }
}

/// Pack rows `p0..p0+kc` of `B` into panels of `nr` columns: `out[(jp*kc + p)*nr + j]`.
fn pack_b(b: MatRef, p0: usize, kc: usize, nr: usize, out: &mut [f32]) {
    let n = b.cols;
    for (jp, panel) in out.chunks_exact_mut(nr * kc).enumerate() {
        let j0 = jp * nr;
        let w = nr.min(n - j0);
        if w < nr {
            panel.fill(0.0);
        }
        if b.cs == 1 {
            for p in 0..kc {
                let s = (p0 + p) * b.rs + j0;
                panel[p * nr..p * nr + w].copy_from_slice(&b.data[s..s + w]);
            }
        } else {
            for j in 0..w {
                let base = (j0 + j) * b.cs + p0 * b.rs;
                for p in 0..kc {
                    panel[p * nr + j] = b.data[base + p * b.rs];
                }
            }
        }
    }
}

/// Pack rows `i0..i0+mc`, columns `p0..p0+kc` of `A` into micro-panels of `mr` rows:
/// `out[(ip*kc + p)*mr + r]`, zero beyond the last row.
fn pack_a(a: MatRef, i0: usize, mc: usize, p0: usize, kc: usize, mr: usize, out: &mut [f32]) {
    for (ip, panel) in out.chunks_exact_mut(mr * kc).enumerate() {
        let r0 = ip * mr;
        let h = mr.min(mc - r0);
        if h < mr {
            panel.fill(0.0);
        }
        if a.cs == 1 && h == mr {
            // Row-major A, a full panel: the micro-kernels' row counts, unrolled.
            let first = (i0 + r0) * a.rs + p0;
            match mr {
                12 => pack_rows::<12>(a.data, a.rs, first, kc, panel),
                6 => pack_rows::<6>(a.data, a.rs, first, kc, panel),
                4 => pack_rows::<4>(a.data, a.rs, first, kc, panel),
                _ => pack_rows_any(a.data, a.rs, first, h, kc, mr, panel),
            }
        } else if a.cs == 1 {
            pack_rows_any(a.data, a.rs, (i0 + r0) * a.rs + p0, h, kc, mr, panel);
        } else if a.rs == 1 {
            // A transposed view (e.g. a gradient's rows as the columns of A): each depth
            // step's rows are contiguous.
            for p in 0..kc {
                let s = (p0 + p) * a.cs + i0 + r0;
                panel[p * mr..p * mr + h].copy_from_slice(&a.data[s..s + h]);
            }
        } else {
            for p in 0..kc {
                let base = (p0 + p) * a.cs + (i0 + r0) * a.rs;
                for r in 0..h {
                    panel[p * mr + r] = a.data[base + r * a.rs];
                }
            }
        }
    }
}

/// One full A micro-panel of `MR` row-major rows (row stride `rs`, the first value at
/// `first`), `kc` deep, written k-major.
fn pack_rows<const MR: usize>(data: &[f32], rs: usize, first: usize, kc: usize, panel: &mut [f32]) {
    let rows: [&[f32]; MR] = std::array::from_fn(|r| &data[first + r * rs..first + r * rs + kc]);
    for (p, dst) in panel[..MR * kc].chunks_exact_mut(MR).enumerate() {
        for r in 0..MR {
            // SAFETY: p < kc (the panel holds kc chunks of MR) and each row has kc values.
            dst[r] = unsafe { *rows[r].get_unchecked(p) };
        }
    }
}

/// [`pack_rows`] for any row count `h` <= `mr` (the rows past `h` are left as they are).
fn pack_rows_any(
    data: &[f32],
    rs: usize,
    first: usize,
    h: usize,
    kc: usize,
    mr: usize,
    panel: &mut [f32],
) {
    let rows: Vec<&[f32]> = (0..h)
        .map(|r| &data[first + r * rs..first + r * rs + kc])
        .collect();
    for (p, dst) in panel.chunks_exact_mut(mr).enumerate() {
        for (d, row) in dst.iter_mut().zip(&rows) {
            *d = row[p];
        }
    }
}

/// Portable 4 x 8 micro-kernel.
///
/// # Safety
/// `a` holds `kc * 4` values, `b` holds `kc * 8`, `c` points at a 4 x 8 tile with row stride
/// `ldc`.
unsafe fn portable_4x8(
    kc: usize,
    a: *const f32,
    b: *const f32,
    c: *mut f32,
    ldc: usize,
    acc: bool,
) {
    let mut t = [[0f32; 8]; 4];
    // SAFETY: per the contract above.
    unsafe {
        let a = std::slice::from_raw_parts(a, kc * 4);
        let b = std::slice::from_raw_parts(b, kc * 8);
        for p in 0..kc {
            let bv = &b[p * 8..p * 8 + 8];
            for (r, tr) in t.iter_mut().enumerate() {
                let av = a[p * 4 + r];
                for (x, &bj) in tr.iter_mut().zip(bv) {
                    *x += av * bj;
                }
            }
        }
        for (r, tr) in t.iter().enumerate() {
            let row = std::slice::from_raw_parts_mut(c.add(r * ldc), 8);
            for (x, &v) in row.iter_mut().zip(tr) {
                *x = if acc { *x + v } else { v };
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// One row of the tile per `$r: $x $y` (two vectors of `$w` lanes each); the whole tile
    /// lives in registers for the k loop.
    macro_rules! tile {
        ($kc:expr, $a:expr, $b:expr, $c:expr, $ldc:expr, $acc:expr, $mr:literal, $w:literal,
         $zero:ident, $load:ident, $store:ident, $set1:ident, $fma:ident, $add:ident;
         $($r:literal : $x:ident $y:ident),*) => {{
            $(let mut $x = $zero(); let mut $y = $zero();)*
            let mut ap = $a;
            let mut bp = $b;
            for _ in 0..$kc {
                let b0 = $load(bp);
                let b1 = $load(bp.add($w));
                $(
                    let av = $set1(*ap.add($r));
                    $x = $fma(av, b0, $x);
                    $y = $fma(av, b1, $y);
                )*
                ap = ap.add($mr);
                bp = bp.add(2 * $w);
            }
            $(
                let cp = $c.add($r * $ldc);
                if $acc {
                    $x = $add($x, $load(cp));
                    $y = $add($y, $load(cp.add($w)));
                }
                $store(cp, $x);
                $store(cp.add($w), $y);
            )*
        }};
    }

    /// AVX-512 12 x 32 micro-kernel (24 accumulators).
    ///
    /// # Safety
    /// The CPU has AVX-512F; `a` holds `kc * 12` values, `b` `kc * 32`, `c` points at a
    /// 12 x 32 tile with row stride `ldc`.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn avx512_12x32(
        kc: usize,
        a: *const f32,
        b: *const f32,
        c: *mut f32,
        ldc: usize,
        acc: bool,
    ) {
        // SAFETY: per the contract above.
        unsafe {
            tile!(kc, a, b, c, ldc, acc, 12, 16,
                _mm512_setzero_ps, _mm512_loadu_ps, _mm512_storeu_ps, _mm512_set1_ps,
                _mm512_fmadd_ps, _mm512_add_ps;
                0: c0 d0, 1: c1 d1, 2: c2 d2, 3: c3 d3, 4: c4 d4, 5: c5 d5,
                6: c6 d6, 7: c7 d7, 8: c8 d8, 9: c9 d9, 10: c10 d10, 11: c11 d11)
        }
    }

    /// AVX2 + FMA 6 x 16 micro-kernel (12 accumulators).
    ///
    /// # Safety
    /// The CPU has AVX2 and FMA; `a` holds `kc * 6` values, `b` `kc * 16`, `c` points at a
    /// 6 x 16 tile with row stride `ldc`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn avx2_6x16(
        kc: usize,
        a: *const f32,
        b: *const f32,
        c: *mut f32,
        ldc: usize,
        acc: bool,
    ) {
        // SAFETY: per the contract above.
        unsafe {
            tile!(kc, a, b, c, ldc, acc, 6, 8,
                _mm256_setzero_ps, _mm256_loadu_ps, _mm256_storeu_ps, _mm256_set1_ps,
                _mm256_fmadd_ps, _mm256_add_ps;
                0: c0 d0, 1: c1 d1, 2: c2 d2, 3: c3 d3, 4: c4 d4, 5: c5 d5)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng, rngs::StdRng};

    fn naive(a: MatRef, b: MatRef) -> Vec<f64> {
        let mut c = vec![0f64; a.rows * b.cols];
        for i in 0..a.rows {
            for j in 0..b.cols {
                c[i * b.cols + j] = (0..a.cols)
                    .map(|p| {
                        a.data[i * a.rs + p * a.cs] as f64 * b.data[p * b.rs + j * b.cs] as f64
                    })
                    .sum();
            }
        }
        c
    }

    #[test]
    fn every_kernel_matches_a_naive_product_on_odd_shapes_and_strides() {
        let mut rng = StdRng::seed_from_u64(5);
        // Shapes cover edge tiles in both directions, several depth blocks and row blocks.
        let shapes = [
            (1, 1, 1),
            (3, 5, 7),
            (13, 33, 17),
            (97, 300, 45),
            (200, 520, 64),
            (12, 32, 32),
        ];
        for &isa in Isa::available() {
            for &(m, k, n) in &shapes {
                for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
                    let av: Vec<f32> = (0..m * k).map(|_| rng.random_range(-1.0..1.0)).collect();
                    let bv: Vec<f32> = (0..k * n).map(|_| rng.random_range(-1.0..1.0)).collect();
                    let a = if ta {
                        MatRef::row_major(&av, k, m).t()
                    } else {
                        MatRef::row_major(&av, m, k)
                    };
                    let b = if tb {
                        MatRef::row_major(&bv, n, k).t()
                    } else {
                        MatRef::row_major(&bv, k, n)
                    };
                    let want = naive(a, b);
                    let init: Vec<f32> = (0..m * n).map(|_| rng.random_range(-1.0..1.0)).collect();
                    for accumulate in [false, true] {
                        let mut c = init.clone();
                        sgemm_isa(isa, a, b, &mut c, accumulate);
                        for (idx, (&got, &w)) in c.iter().zip(&want).enumerate() {
                            let w = if accumulate { w + init[idx] as f64 } else { w };
                            assert!(
                                (got as f64 - w).abs() <= 1e-4 * (1.0 + w.abs()),
                                "{isa:?} {m}x{k}x{n} ta={ta} tb={tb} acc={accumulate} \
                                 [{idx}]: {got} vs {w}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn zero_depth_clears_or_keeps_the_output() {
        let a = MatRef::row_major(&[], 2, 0);
        let b = MatRef::row_major(&[], 0, 3);
        let mut c = vec![1f32; 6];
        sgemm(a, b, &mut c, true);
        assert_eq!(c, vec![1.0; 6]);
        sgemm(a, b, &mut c, false);
        assert_eq!(c, vec![0.0; 6]);
    }
}
