//! The layer nodes' data movement around the attention, one op each way.
//!
//! Forward ([`split`]): from the QKV projection of the packed streams (rows, 3 hidden; per head
//! `[q | k | v]`) to the attention's inputs: each stream's queries, keys and values as (b,
//! heads, t, head_size) with the first rotary dims of queries and keys rotated, and for the
//! response stream the keys and values of its prompt followed by its own. With candle ops that
//! was about 28 tensors per layer (split, transposed copies, rotations and their
//! concatenations, the prompts' keys and values gathered per response, joined): at the P3 shape
//! 963 MiB written per layer (`overopt-gpu-bench --profile`, `fwd.layer.qkv_heads_rope`). Here
//! one op per output writes each of the six tensors once.
//!
//! Backward ([`join_grads`]): from the attention's input gradients back to the QKV
//! projection's (rows, 3 hidden): the rotations undone, the gradients of a prompt's keys and
//! values that its responses read added to the prompt's own, heads joined per row. With candle
//! ops about 30 tensors (1,505 MiB per layer at the P3 shape); here one op writes the result.
//!
//! Both round as the candle ops they replace, so the values are theirs bit for bit (unit tests
//! in `layer_node`): f32 as f32 arithmetic; bf16 rounding to bf16 after each product, sum and
//! difference, as candle's bf16 ops do; the prompt's key and value gradients summed in the
//! order of the responses, as `index_add` does. On the CPU loops, on CUDA a kernel each way
//! ([`SOURCE`], compiled by NVRTC; one thread per output element). Where neither applies (f16,
//! NVRTC failed, `OVEROPT_NO_FUSED=1`) the layer nodes keep their candle ops.

use super::fused::contiguous_range;
use super::nvrtc::Source;
use candle_core::{
    CpuStorage, CustomOp1, DType, Device, Layout, Result, Shape, Storage, Tensor, WithDType,
};
use rayon::prelude::*;

/// The shapes of one forward pass (see [`super::layer_node::Streams`]) and what both ops read
/// besides their main input: the rotary tables and the responses' prompts.
#[derive(Debug, Clone)]
pub(crate) struct Plan {
    /// `n` prompts of `pm` rows, then `m` responses of `rm` rows.
    pub n: usize,
    pub pm: usize,
    pub m: usize,
    pub rm: usize,
    pub heads: usize,
    pub hs: usize,
    /// Rotated dims per head (0: none).
    pub nd: usize,
    /// (2, rows, max(nd / 2, 1)): per row of the packed streams the cos halves, then the sin
    /// halves, in the compute dtype.
    tab: Tensor,
    /// (m,) u32: the prompt of each response.
    rows: Tensor,
    /// (n + 1,) and (m,) u32: the responses of each prompt, ascending (CSR).
    resp_off: Tensor,
    resp_list: Tensor,
}

impl Plan {
    /// A plan for queries and keys rotated by the tables `cos_sin` (per stream (b, 1, t, nd),
    /// in `dtype`), or None where the ops do not apply (see the module docs). `rows`: the
    /// prompt of each response, on the host and (`rows_dev`) on the device.
    pub fn new(
        (n, pm, m, rm): (usize, usize, usize, usize),
        (rows, rows_dev): (&[u32], &Tensor),
        (heads, hs, nd): (usize, usize, usize),
        cos_sin: [&(Tensor, Tensor); 2],
        dtype: DType,
        dev: &Device,
    ) -> Result<Option<Self>> {
        if !matches!(dtype, DType::F32 | DType::BF16)
            || !super::fused::enabled()
            || !super::nvrtc::ready(dev, &SOURCE)
            || rows.len() != m
            || nd % 2 != 0
            || nd > hs
        {
            return Ok(None);
        }
        let half = (nd / 2).max(1);
        let tab = if nd == 0 {
            Tensor::zeros((2, n * pm + m * rm, half), dtype, dev)?
        } else {
            let part = |t: &Tensor, b_t: usize| -> Result<Tensor> {
                t.narrow(3, 0, half)?.reshape((b_t, half))?.to_dtype(dtype)
            };
            let [(cp, sp), (cr, sr)] = cos_sin;
            let c = Tensor::cat(&[part(cp, n * pm)?, part(cr, m * rm)?], 0)?;
            let s = Tensor::cat(&[part(sp, n * pm)?, part(sr, m * rm)?], 0)?;
            Tensor::stack(&[c, s], 0)?.contiguous()?
        };
        let mut off = vec![0u32; n + 1];
        for &p in rows {
            if p as usize >= n {
                candle_core::bail!("qkv heads: response of prompt {p}, only {n} prompts");
            }
            off[p as usize + 1] += 1;
        }
        for i in 0..n {
            off[i + 1] += off[i];
        }
        let mut fill = off.clone();
        let mut list = vec![0u32; m];
        for (r, &p) in rows.iter().enumerate() {
            list[fill[p as usize] as usize] = r as u32;
            fill[p as usize] += 1;
        }
        let u = |v: Vec<u32>| {
            let len = v.len();
            Tensor::from_vec(v, len, dev)
        };
        Ok(Some(Self {
            n,
            pm,
            m,
            rm,
            heads,
            hs,
            nd,
            tab,
            rows: rows_dev.clone(),
            resp_off: u(off)?,
            resp_list: u(list)?,
        }))
    }

    fn prompt_rows(&self) -> usize {
        self.n * self.pm
    }

    fn width(&self) -> usize {
        3 * self.heads * self.hs
    }

    /// Elements of each output of [`split`]: q, k, v of the prompts, q of the responses, their
    /// keys and values over [prompt | own].
    fn sizes(&self) -> [usize; 6] {
        let p = self.n * self.heads * self.pm * self.hs;
        let all = self.m * self.heads * (self.pm + self.rm) * self.hs;
        [p, p, p, self.m * self.heads * self.rm * self.hs, all, all]
    }

    fn shapes(&self) -> [(usize, usize, usize, usize); 6] {
        let p = (self.n, self.heads, self.pm, self.hs);
        let all = (self.m, self.heads, self.pm + self.rm, self.hs);
        [p, p, p, (self.m, self.heads, self.rm, self.hs), all, all]
    }
}

/// The attention's inputs `[[q, k, v] of the prompts, [q, k, v] of the responses]` from the
/// QKV projection `qkv` (rows, 3 hidden) of the packed streams; the responses' k and v cover
/// their prompt's rows, then their own. Six tensors of their own (not views into one buffer:
/// candle's CPU matmul widens a bf16 operand's whole storage, not only its view).
pub(crate) fn split(qkv: &Tensor, plan: &Plan) -> Result<[[Tensor; 3]; 2]> {
    let rows = plan.prompt_rows() + plan.m * plan.rm;
    if qkv.dims() != [rows, plan.width()] || qkv.dtype() != plan.tab.dtype() {
        candle_core::bail!(
            "qkv heads: projection {:?} {:?}, expected ({rows}, {}) {:?}",
            qkv.dims(),
            qkv.dtype(),
            plan.width(),
            plan.tab.dtype()
        );
    }
    let qkv = qkv.contiguous()?;
    let part = |seg| qkv.apply_op1_no_bwd(&Split(plan.clone(), seg));
    let [qp, kp, vp, qr, kr, vr] = [part(0)?, part(1)?, part(2)?, part(3)?, part(4)?, part(5)?];
    Ok([[qp, kp, vp], [qr, kr, vr]])
}

/// The gradient (rows, 3 hidden) of the QKV projection from those of the attention's inputs,
/// laid out as [`split`] returns them (any layout; made contiguous).
pub(crate) fn join_grads(g: &[[Tensor; 3]; 2], plan: &Plan) -> Result<Tensor> {
    let shapes = plan.shapes();
    let flat = [&g[0][0], &g[0][1], &g[0][2], &g[1][0], &g[1][1], &g[1][2]];
    let mut others = Vec::with_capacity(5);
    for (i, (t, want)) in flat.iter().zip(shapes).enumerate() {
        if t.dims4()? != want || t.dtype() != plan.tab.dtype() {
            candle_core::bail!(
                "qkv heads: gradient {i} is {:?} {:?}, expected {want:?} {:?}",
                t.dims(),
                t.dtype(),
                plan.tab.dtype()
            );
        }
        if i > 0 {
            others.push(t.contiguous()?);
        }
    }
    let others: [Tensor; 5] = others.try_into().expect("five gradients");
    flat[0]
        .contiguous()?
        .apply_op1_no_bwd(&JoinGrads(plan.clone(), others))
}

/// An f32 or bf16 value as f32 (exact).
fn get<T: WithDType>(v: T) -> f32 {
    v.to_f64() as f32
}

/// An f32 rounded to `T` (to nearest even; an f32 is exact as an f64).
fn put<T: WithDType>(v: f32) -> T {
    T::from_f64(v as f64)
}

/// Rounded to `T` (f32: itself).
fn round<T: WithDType>(v: f32) -> f32 {
    get(put::<T>(v))
}

/// The rotate-half rotation of element `d` (< nd) of a head vector `x` by the half tables
/// `c`, `s` at index `d % (nd / 2)`, forward (`inverse` false: candle's `rope`) or back (its
/// rope with the sine negated), each product, sum and difference rounded to `T`.
fn rotate<T: WithDType>(
    x: impl Fn(usize) -> f32,
    d: usize,
    nd: usize,
    c: f32,
    s: f32,
    inverse: bool,
) -> f32 {
    let half = nd / 2;
    let (x1, x2) = if d < half {
        (x(d), x(d + half))
    } else {
        (x(d - half), x(d))
    };
    let m = |a: f32, b: f32| round::<T>(a * b);
    match (d < half, inverse) {
        (true, false) => round::<T>(m(x1, c) - m(x2, s)),
        (false, false) => round::<T>(m(x1, s) + m(x2, c)),
        (true, true) => round::<T>(m(x1, c) + m(x2, s)),
        (false, true) => round::<T>(m(x2, c) - m(x1, s)),
    }
}

/// Output `.1` of [`split`] (0..6: q, k, v of the prompts, q, k, v of the responses).
struct Split(Plan, usize);

impl Split {
    /// The first element of the output in the index space of all six, and its length.
    fn range(&self) -> (usize, usize) {
        let sizes = self.0.sizes();
        (sizes[..self.1].iter().sum(), sizes[self.1])
    }

    fn run<T: WithDType>(&self, qkv: &[T], tab: &[T], rows: &[u32]) -> Vec<T> {
        let p = &self.0;
        let (hs, w, half, np) = (p.hs, p.width(), (p.nd / 2).max(1), p.prompt_rows());
        let (first, len) = self.range();
        let mut out = vec![put::<T>(0.0); len];
        let bounds: Vec<usize> = p
            .sizes()
            .iter()
            .scan(0, |a, &s| {
                *a += s;
                Some(*a)
            })
            .collect();
        let shapes = p.shapes();
        out.par_chunks_mut(hs).enumerate().for_each(|(v, dst)| {
            let i = first + v * hs;
            let seg = bounds
                .iter()
                .position(|&b| i < b)
                .expect("inside the output");
            let j = i - if seg == 0 { 0 } else { bounds[seg - 1] };
            let (_, nh, t_len, _) = shapes[seg];
            let (b, h, t) = (j / (nh * t_len * hs), j / (t_len * hs) % nh, j / hs % t_len);
            let (row, part) = match seg {
                0..=2 => (b * p.pm + t, seg),
                3 => (np + b * p.rm + t, 0),
                _ if t < p.pm => (rows[b] as usize * p.pm + t, seg - 3),
                _ => (np + b * p.rm + (t - p.pm), seg - 3),
            };
            let base = row * w + h * 3 * hs + part * hs;
            let x = |d: usize| get(qkv[base + d]);
            let (c, s) = (&tab[row * half..], &tab[(np + p.m * p.rm + row) * half..]);
            for (d, o) in dst.iter_mut().enumerate() {
                *o = if part < 2 && d < p.nd {
                    let k = d % half;
                    put(rotate::<T>(x, d, p.nd, get(c[k]), get(s[k]), false))
                } else {
                    qkv[base + d]
                };
            }
        });
        out
    }
}

struct JoinGrads(Plan, [Tensor; 5]);

impl JoinGrads {
    /// `g`: the six gradients' values (dq_p, dk_p, dv_p, dq_r, dk_all, dv_all).
    fn run<T: WithDType>(&self, g: [&[T]; 6], tab: &[T], off: &[u32], list: &[u32]) -> Vec<T> {
        let p = &self.0;
        let (hs, nh, w, half, np) = (p.hs, p.heads, p.width(), (p.nd / 2).max(1), p.prompt_rows());
        let rows = np + p.m * p.rm;
        let ta = p.pm + p.rm;
        let mut out = vec![put::<T>(0.0); rows * w];
        out.par_chunks_mut(hs).enumerate().for_each(|(v, dst)| {
            let (row, h, part) = (v / (3 * nh), v / 3 % nh, v % 3);
            // The head vector's element d (sums in T, in the order of the responses).
            let x = |d: usize| -> f32 {
                if row < np {
                    let (b, t) = (row / p.pm, row % p.pm);
                    let own = get(g[part][((b * nh + h) * p.pm + t) * hs + d]);
                    if part == 0 {
                        return own;
                    }
                    let all = g[3 + part];
                    let (a, e) = (off[b] as usize, off[b + 1] as usize);
                    list[a..e].iter().fold(own, |acc, &r| {
                        round::<T>(acc + get(all[((r as usize * nh + h) * ta + t) * hs + d]))
                    })
                } else {
                    let (b, t) = ((row - np) / p.rm, (row - np) % p.rm);
                    match part {
                        0 => get(g[3][((b * nh + h) * p.rm + t) * hs + d]),
                        _ => get(g[3 + part][((b * nh + h) * ta + p.pm + t) * hs + d]),
                    }
                }
            };
            let (c, s) = (&tab[row * half..], &tab[(rows + row) * half..]);
            for (d, o) in dst.iter_mut().enumerate() {
                *o = put(if part < 2 && d < p.nd {
                    let k = d % half;
                    rotate::<T>(x, d, p.nd, get(c[k]), get(s[k]), true)
                } else {
                    x(d)
                });
            }
        });
        out
    }
}

/// The contiguous values of a CPU storage of variant `$v` (F32, BF16), or an error.
macro_rules! cpu_values_of {
    ($s:expr, $l:expr, $v:ident, $op:expr) => {
        match $s {
            CpuStorage::$v(v) => {
                let (a, e) = contiguous_range($l, $op)?;
                &v[a..e]
            }
            _ => candle_core::bail!("{}: a tensor has another dtype", $op),
        }
    };
}

/// `$go!(F32)` or `$go!(BF16)`, by the variant of the CPU storage `$s`, or an error.
macro_rules! by_cpu_dtype {
    ($s:expr, $op:expr, $go:ident) => {
        match $s {
            CpuStorage::F32(_) => $go!(F32),
            CpuStorage::BF16(_) => $go!(BF16),
            _ => candle_core::bail!("{}: expects f32 or bf16", $op),
        }
    };
}

/// `f` with the CPU storage and layout of `t`.
fn with_cpu<R>(t: &Tensor, f: impl FnOnce(&CpuStorage, &Layout) -> Result<R>) -> Result<R> {
    let (s, l) = t.storage_and_layout();
    match &*s {
        Storage::Cpu(c) => f(c, l),
        _ => candle_core::bail!("qkv heads: a tensor is not on the CPU"),
    }
}

impl CustomOp1 for Split {
    fn name(&self) -> &'static str {
        "qkv-heads-split"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let p = &self.0;
        let name = self.name();
        let rows = p.rows.to_vec1::<u32>()?;
        let out = with_cpu(&p.tab, |ts, tl| {
            macro_rules! go {
                ($v:ident) => {
                    CpuStorage::$v(self.run(
                        cpu_values_of!(s, l, $v, name),
                        cpu_values_of!(ts, tl, $v, name),
                        &rows,
                    ))
                };
            }
            Ok(by_cpu_dtype!(s, name, go))
        })?;
        Ok((out, Shape::from(p.shapes()[self.1])))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let out = cuda::split(&self.0, s, l, self.range())?;
        Ok((out, Shape::from(self.0.shapes()[self.1])))
    }
}

impl CustomOp1 for JoinGrads {
    fn name(&self) -> &'static str {
        "qkv-heads-join-grads"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let p = &self.0;
        let name = self.name();
        let (off, list) = (p.resp_off.to_vec1::<u32>()?, p.resp_list.to_vec1::<u32>()?);
        // The five other gradients' storages, read in place.
        let guards: Vec<_> = self.1.iter().map(|t| t.storage_and_layout()).collect();
        let mut cpu = Vec::with_capacity(5);
        for (g, gl) in &guards {
            match &**g {
                Storage::Cpu(c) => cpu.push((c, *gl)),
                _ => candle_core::bail!("{name}: a gradient is not on the CPU"),
            }
        }
        let out = with_cpu(&p.tab, |ts, tl| {
            macro_rules! go {
                ($v:ident) => {{
                    let mut g = [cpu_values_of!(s, l, $v, name); 6];
                    for (i, (c, cl)) in cpu.iter().enumerate() {
                        g[i + 1] = cpu_values_of!(*c, *cl, $v, name);
                    }
                    CpuStorage::$v(self.run(g, cpu_values_of!(ts, tl, $v, name), &off, &list))
                }};
            }
            Ok(by_cpu_dtype!(s, name, go))
        })?;
        Ok((out, Shape::from((p.prompt_rows() + p.m * p.rm, p.width()))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let p = &self.0;
        let out = cuda::join_grads(p, &self.1, s, l)?;
        Ok((out, Shape::from((p.prompt_rows() + p.m * p.rm, p.width()))))
    }
}

/// The CUDA kernels: the CPU loops above, one thread per output element (`ROUND` rounds an
/// f32 to the element type and back; the bf16 kernels load and store its 16 bits).
pub(crate) const SOURCE: Source = Source {
    module: "overopt_qkv_heads",
    text: r#"
__device__ __forceinline__ float overopt_id(float v) { return v; }
__device__ __forceinline__ float overopt_rbf16(float v) {
    return overopt_bf16_to_f32(overopt_f32_to_bf16(v));
}
#define OVEROPT_ROTATE(ROUND, x1, x2, c, s, first, inverse)                            \
    ((first) ? ((inverse) ? ROUND(ROUND((x1) * (c)) + ROUND((x2) * (s)))             \
                          : ROUND(ROUND((x1) * (c)) - ROUND((x2) * (s))))            \
             : ((inverse) ? ROUND(ROUND((x2) * (c)) - ROUND((x1) * (s)))             \
                          : ROUND(ROUND((x1) * (s)) + ROUND((x2) * (c)))))

#define OVEROPT_QKV_KERNELS(SUFFIX, T, LOAD, STORE, ROUND)                              \
extern "C" __global__ void overopt_qkv_split_##SUFFIX(                                 \
    const T *qkv, const T *tab, const unsigned int *rows, T *out, unsigned int first,  \
    unsigned int total, unsigned int n, unsigned int pm, unsigned int m,               \
    unsigned int rm, unsigned int nh, unsigned int hs, unsigned int nd) {              \
    unsigned int o = blockIdx.x * blockDim.x + threadIdx.x;                            \
    if (o >= total) return;                                                            \
    unsigned int i = first + o;                                                        \
    unsigned int sp = n * nh * pm * hs, sqr = m * nh * rm * hs;                         \
    unsigned int sa = m * nh * (pm + rm) * hs, np = n * pm, w = 3 * nh * hs;            \
    unsigned int half = nd / 2 > 0 ? nd / 2 : 1;                                        \
    unsigned int seg, j, tl;                                                           \
    if (i < 3 * sp) { seg = i / sp; j = i % sp; tl = pm; }                             \
    else if (i < 3 * sp + sqr) { seg = 3; j = i - 3 * sp; tl = rm; }                   \
    else { j = i - 3 * sp - sqr; seg = 4 + j / sa; j = j % sa; tl = pm + rm; }         \
    unsigned int d = j % hs, t = j / hs % tl, h = j / (hs * tl) % nh, b = j / (hs * tl * nh); \
    unsigned int row, part;                                                            \
    if (seg < 3) { row = b * pm + t; part = seg; }                                     \
    else if (seg == 3) { row = np + b * rm + t; part = 0; }                            \
    else { part = seg - 3; row = t < pm ? rows[b] * pm + t : np + b * rm + (t - pm); } \
    unsigned long long base = (unsigned long long)row * w + h * 3 * hs + part * hs;     \
    if (part < 2 && d < nd) {                                                          \
        unsigned int k = d % half, rws = np + m * rm;                                  \
        float c = LOAD(tab[(unsigned long long)row * half + k]);                       \
        float s = LOAD(tab[(unsigned long long)(rws + row) * half + k]);               \
        bool lo = d < nd / 2;                                                          \
        float x1 = LOAD(qkv[base + (lo ? d : d - nd / 2)]);                            \
        float x2 = LOAD(qkv[base + (lo ? d + nd / 2 : d)]);                            \
        out[o] = STORE(OVEROPT_ROTATE(ROUND, x1, x2, c, s, lo, false));                \
    } else {                                                                           \
        out[o] = qkv[base + d];                                                        \
    }                                                                                  \
}                                                                                      \
__device__ __forceinline__ float overopt_qkv_grad_elem_##SUFFIX(                       \
    const T *dqp, const T *dkp, const T *dvp, const T *dqr, const T *dka,              \
    const T *dva, const unsigned int *off, const unsigned int *list, unsigned int row, \
    unsigned int h, unsigned int part, unsigned int d, unsigned int np,                \
    unsigned int pm, unsigned int rm, unsigned int nh, unsigned int hs) {              \
    unsigned int ta = pm + rm;                                                         \
    if (row < np) {                                                                    \
        unsigned int b = row / pm, t = row % pm;                                       \
        unsigned long long at = ((unsigned long long)(b * nh + h) * pm + t) * hs + d;   \
        if (part == 0) return LOAD(dqp[at]);                                           \
        const T *all = part == 1 ? dka : dva;                                          \
        float acc = LOAD((part == 1 ? dkp : dvp)[at]);                                 \
        for (unsigned int q = off[b]; q < off[b + 1]; q++) {                           \
            unsigned long long r = list[q];                                            \
            acc = ROUND(acc + LOAD(all[((r * nh + h) * ta + t) * hs + d]));            \
        }                                                                              \
        return acc;                                                                    \
    }                                                                                  \
    unsigned int b = (row - np) / rm, t = (row - np) % rm;                             \
    if (part == 0) return LOAD(dqr[((unsigned long long)(b * nh + h) * rm + t) * hs + d]); \
    const T *all = part == 1 ? dka : dva;                                              \
    return LOAD(all[((unsigned long long)(b * nh + h) * ta + pm + t) * hs + d]);       \
}                                                                                      \
extern "C" __global__ void overopt_qkv_join_grads_##SUFFIX(                            \
    const T *dqp, const T *dkp, const T *dvp, const T *dqr, const T *dka,              \
    const T *dva, const T *tab, const unsigned int *off, const unsigned int *list,     \
    T *out, unsigned int total, unsigned int n, unsigned int pm, unsigned int m,       \
    unsigned int rm, unsigned int nh, unsigned int hs, unsigned int nd) {              \
    unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;                            \
    if (i >= total) return;                                                            \
    unsigned int np = n * pm, w = 3 * nh * hs, rws = np + m * rm;                       \
    unsigned int half = nd / 2 > 0 ? nd / 2 : 1;                                        \
    unsigned int row = i / w, c3 = i % w, h = c3 / (3 * hs), part = c3 / hs % 3;       \
    unsigned int d = c3 % hs;                                                          \
    if (part < 2 && d < nd) {                                                          \
        unsigned int k = d % half;                                                     \
        float c = LOAD(tab[(unsigned long long)row * half + k]);                       \
        float s = LOAD(tab[(unsigned long long)(rws + row) * half + k]);               \
        bool first = d < nd / 2;                                                       \
        unsigned int d1 = first ? d : d - nd / 2, d2 = first ? d + nd / 2 : d;         \
        float x1 = overopt_qkv_grad_elem_##SUFFIX(dqp, dkp, dvp, dqr, dka, dva, off,   \
            list, row, h, part, d1, np, pm, rm, nh, hs);                               \
        float x2 = overopt_qkv_grad_elem_##SUFFIX(dqp, dkp, dvp, dqr, dka, dva, off,   \
            list, row, h, part, d2, np, pm, rm, nh, hs);                               \
        out[i] = STORE(OVEROPT_ROTATE(ROUND, x1, x2, c, s, first, true));              \
    } else {                                                                           \
        out[i] = STORE(overopt_qkv_grad_elem_##SUFFIX(dqp, dkp, dvp, dqr, dka, dva,    \
            off, list, row, h, part, d, np, pm, rm, nh, hs));                          \
    }                                                                                  \
}

OVEROPT_QKV_KERNELS(f32, float, overopt_id, overopt_id, overopt_id)
OVEROPT_QKV_KERNELS(bf16, unsigned short, overopt_bf16_to_f32, overopt_f32_to_bf16, overopt_rbf16)
"#,
};

#[cfg(feature = "cuda")]
mod cuda {
    use super::Plan;
    use crate::model::nvrtc::{self, view};
    use candle_core::cuda_backend::CudaStorageSlice as S;
    use candle_core::cuda_backend::cudarc::driver::{
        CudaSlice, CudaView, DeviceRepr, PushKernelArg,
    };
    use candle_core::{CudaStorage, Layout, Result, Storage, Tensor, backend::BackendStorage};

    /// The CUDA storage behind a tensor (read-locked for the guard's life).
    fn storage(t: &Tensor) -> (impl std::ops::Deref<Target = Storage> + '_, Layout) {
        let (s, l) = t.storage_and_layout();
        let l = l.clone();
        (s, l)
    }

    fn cuda<'a>(s: &'a Storage, op: &str) -> Result<&'a CudaStorage> {
        match s {
            Storage::Cuda(c) => Ok(c),
            _ => candle_core::bail!("{op}: a tensor is not on the CUDA device"),
        }
    }

    fn u32s<'a>(s: &'a CudaStorage, l: &Layout, op: &str) -> Result<CudaView<'a, u32>> {
        view(s.as_cuda_slice::<u32>()?, l, op)
    }

    /// The elements `first..first + len` of [`super::split`]'s six outputs.
    pub fn split(
        p: &Plan,
        s: &CudaStorage,
        l: &Layout,
        (first, len): (usize, usize),
    ) -> Result<CudaStorage> {
        let op = "qkv-heads-split";
        let dev = s.device().clone();
        let n = nvrtc::len(op, len)?;
        let first = nvrtc::len(op, first)?;
        let (tg, tl) = storage(&p.tab);
        let (rg, rl) = storage(&p.rows);
        let (tab, rows) = (cuda(&tg, op)?, cuda(&rg, op)?);
        let rows = u32s(rows, &rl, op)?;
        let dims = [p.n, p.pm, p.m, p.rm, p.heads, p.hs, p.nd].map(|v| v as u32);
        fn go<T: DeviceRepr>(
            dev: &candle_core::CudaDevice,
            kernel: &str,
            (qkv, tab, rows): (CudaView<'_, T>, CudaView<'_, T>, &CudaView<'_, u32>),
            (first, n): (u32, u32),
            dims: [u32; 7],
        ) -> Result<CudaSlice<T>> {
            let func = nvrtc::func(dev, &super::SOURCE, kernel)?;
            // SAFETY: the kernel writes all n elements.
            let mut out = unsafe { dev.alloc::<T>(n as usize)? };
            let stream = dev.cuda_stream();
            let mut args = stream.launch_builder(&func);
            args.arg(&qkv);
            args.arg(&tab);
            args.arg(rows);
            args.arg(&mut out);
            args.arg(&first);
            args.arg(&n);
            for d in &dims {
                args.arg(d);
            }
            nvrtc::launch(args, n)?;
            Ok(out)
        }
        let n = (first, n);
        let slice = match (&s.slice, &tab.slice) {
            (S::F32(x), S::F32(t)) => S::F32(go(
                &dev,
                "overopt_qkv_split_f32",
                (view(x, l, op)?, view(t, &tl, op)?, &rows),
                n,
                dims,
            )?),
            (S::BF16(x), S::BF16(t)) => S::BF16(go(
                &dev,
                "overopt_qkv_split_bf16",
                (view(x, l, op)?, view(t, &tl, op)?, &rows),
                n,
                dims,
            )?),
            _ => candle_core::bail!("{op}: expects f32 or bf16 of one dtype"),
        };
        Ok(CudaStorage { slice, device: dev })
    }

    pub fn join_grads(
        p: &Plan,
        others: &[Tensor; 5],
        s: &CudaStorage,
        l: &Layout,
    ) -> Result<CudaStorage> {
        let op = "qkv-heads-join-grads";
        let dev = s.device().clone();
        let total = (p.n * p.pm + p.m * p.rm) * 3 * p.heads * p.hs;
        let n = nvrtc::len(op, total)?;
        let guards: Vec<_> = others.iter().map(storage).collect();
        let (tg, tl) = storage(&p.tab);
        let (og, ol) = storage(&p.resp_off);
        let (lg, ll) = storage(&p.resp_list);
        let tab = cuda(&tg, op)?;
        let off = u32s(cuda(&og, op)?, &ol, op)?;
        let list = u32s(cuda(&lg, op)?, &ll, op)?;
        let dims = [p.n, p.pm, p.m, p.rm, p.heads, p.hs, p.nd].map(|v| v as u32);
        let mut gs = vec![(s, l.clone())];
        for (g, gl) in &guards {
            gs.push((cuda(g, op)?, gl.clone()));
        }
        fn go<T: DeviceRepr>(
            dev: &candle_core::CudaDevice,
            kernel: &str,
            views: &[CudaView<'_, T>],
            (tab, off, list): (CudaView<'_, T>, &CudaView<'_, u32>, &CudaView<'_, u32>),
            n: u32,
            dims: [u32; 7],
        ) -> Result<CudaSlice<T>> {
            let func = nvrtc::func(dev, &super::SOURCE, kernel)?;
            // SAFETY: the kernel writes all n elements.
            let mut out = unsafe { dev.alloc::<T>(n as usize)? };
            let stream = dev.cuda_stream();
            let mut args = stream.launch_builder(&func);
            for v in views {
                args.arg(v);
            }
            args.arg(&tab);
            args.arg(off);
            args.arg(list);
            args.arg(&mut out);
            args.arg(&n);
            for d in &dims {
                args.arg(d);
            }
            nvrtc::launch(args, n)?;
            Ok(out)
        }
        macro_rules! views {
            ($v:ident) => {{
                let mut views = Vec::with_capacity(6);
                for (g, gl) in &gs {
                    match &g.slice {
                        S::$v(x) => views.push(view(x, gl, op)?),
                        _ => candle_core::bail!("{op}: the gradients differ in dtype"),
                    }
                }
                let S::$v(t) = &tab.slice else {
                    candle_core::bail!("{op}: the tables' dtype differs")
                };
                (views, view(t, &tl, op)?)
            }};
        }
        let slice = match &s.slice {
            S::F32(_) => {
                let (views, tab) = views!(F32);
                let k = "overopt_qkv_join_grads_f32";
                S::F32(go(&dev, k, &views, (tab, &off, &list), n, dims)?)
            }
            S::BF16(_) => {
                let (views, tab) = views!(BF16);
                let k = "overopt_qkv_join_grads_bf16";
                S::BF16(go(&dev, k, &views, (tab, &off, &list), n, dims)?)
            }
            _ => candle_core::bail!("{op}: expects f32 or bf16"),
        };
        Ok(CudaStorage { slice, device: dev })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::nvrtc::{HostKernels, value_bits};

    /// Reads `split|join f32|bf16 n pm m rm nh hs nd`, then the op's inputs as hexadecimal bits
    /// (split: qkv, the tables, the responses' prompts; join: the six gradients, the tables,
    /// the CSR offsets and list), runs the kernel for every output index and prints the
    /// output's bits.
    const DRIVER: &str = r#"
static float from_bits(unsigned int b, float) { return __uint_as_float(b); }
static unsigned short from_bits(unsigned int b, unsigned short) { return (unsigned short)b; }
static unsigned int to_bits(float v) { return __float_as_uint(v); }
static unsigned int to_bits(unsigned short v) { return v; }
template <class T> static std::vector<T> rd(size_t n) {
  std::vector<T> v(n);
  for (auto &x : v) { unsigned int b; if (std::scanf("%x", &b) != 1) throw 1; x = from_bits(b, T()); }
  return v;
}
static std::vector<unsigned int> rd_u32(size_t n) {
  std::vector<unsigned int> v(n);
  for (auto &x : v) if (std::scanf("%x", &x) != 1) throw 1;
  return v;
}
static void each(unsigned int total, const std::function<void()> &k) {
  blockDim.x = 128;
  for (unsigned int i = 0; i < total; i++) { blockIdx.x = i / 128; threadIdx.x = i % 128; k(); }
}
template <class T, class Split, class Join>
static void go(bool split, Split ks, Join kj, unsigned int n, unsigned int pm, unsigned int m,
               unsigned int rm, unsigned int nh, unsigned int hs, unsigned int nd) {
  unsigned int sp = n * nh * pm * hs, sqr = m * nh * rm * hs, sa = m * nh * (pm + rm) * hs;
  unsigned int rows = n * pm + m * rm, w = 3 * nh * hs, half = nd / 2 > 0 ? nd / 2 : 1;
  std::vector<T> out;
  if (split) {
    auto qkv = rd<T>(rows * w); auto tab = rd<T>(2 * rows * half); auto r = rd_u32(m);
    // One launch per output, as the op does.
    unsigned int sizes[6] = {sp, sp, sp, sqr, sa, sa}, first = 0;
    out.resize(3 * sp + sqr + 2 * sa);
    for (unsigned int seg = 0; seg < 6; seg++) {
      T *dst = out.data() + first;
      each(sizes[seg], [&] { ks(qkv.data(), tab.data(), r.data(), dst, first, sizes[seg], n, pm, m, rm, nh, hs, nd); });
      first += sizes[seg];
    }
  } else {
    auto dqp = rd<T>(sp), dkp = rd<T>(sp), dvp = rd<T>(sp), dqr = rd<T>(sqr);
    auto dka = rd<T>(sa), dva = rd<T>(sa), tab = rd<T>(2 * rows * half);
    auto off = rd_u32(n + 1), list = rd_u32(m);
    unsigned int total = rows * w;
    out.resize(total);
    each(total, [&] {
      kj(dqp.data(), dkp.data(), dvp.data(), dqr.data(), dka.data(), dva.data(), tab.data(),
         off.data(), list.data(), out.data(), total, n, pm, m, rm, nh, hs, nd);
    });
  }
  for (auto v : out) std::printf("%x\n", to_bits(v));
}
int main() {
  char mode[8], kind[8]; unsigned int n, pm, m, rm, nh, hs, nd;
  if (std::scanf("%7s %7s %u %u %u %u %u %u %u", mode, kind, &n, &pm, &m, &rm, &nh, &hs, &nd) != 9) return 2;
  bool split = std::strcmp(mode, "split") == 0;
  if (std::strcmp(kind, "f32") == 0)
    go<float>(split, overopt_qkv_split_f32, overopt_qkv_join_grads_f32, n, pm, m, rm, nh, hs, nd);
  else
    go<unsigned short>(split, overopt_qkv_split_bf16, overopt_qkv_join_grads_bf16, n, pm, m, rm, nh, hs, nd);
  return 0;
}
"#;

    fn u32s(t: &Tensor) -> Vec<u32> {
        t.to_vec1::<u32>().unwrap()
    }

    /// The CUDA kernels, compiled for the CPU, give the CPU loops' values bit for bit (f32 and
    /// bf16; 6 of 8 dims rotated; a prompt without responses, one with three).
    #[test]
    fn cuda_kernels_compute_the_cpu_loops_bit_for_bit() {
        let kernels = HostKernels::new(&SOURCE, &format!("#include <functional>\n{DRIVER}"));
        let dev = Device::Cpu;
        let (n, pm, m, rm, nh, hs, nd) = (3, 4, 5, 2, 2, 8, 6);
        let rows = [2u32, 0, 2, 2, 0];
        for dt in [DType::F32, DType::BF16] {
            let rnd = |shape: &[usize]| {
                let t = Tensor::randn(0f32, 2.0, shape, &dev).unwrap();
                t.to_dtype(dt).unwrap()
            };
            let table = |b: usize, t: usize| {
                let half = rnd(&[b, 1, t, nd / 2]);
                Tensor::cat(&[&half, &half], 3).unwrap()
            };
            let cs = [(table(n, pm), table(n, pm)), (table(m, rm), table(m, rm))];
            let rows_dev = Tensor::new(&rows, &dev).unwrap();
            let plan = Plan::new(
                (n, pm, m, rm),
                (&rows, &rows_dev),
                (nh, hs, nd),
                [&cs[0], &cs[1]],
                dt,
                &dev,
            )
            .unwrap()
            .unwrap();
            let kind = if dt == DType::F32 { "f32" } else { "bf16" };
            let header = |mode: &str| format!("{mode} {kind} {n} {pm} {m} {rm} {nh} {hs} {nd}");
            let total_rows = n * pm + m * rm;
            let qkv = rnd(&[total_rows, 3 * nh * hs]);
            let cpu: Vec<u32> = (0..6)
                .flat_map(|seg| {
                    value_bits(&qkv.apply_op1_no_bwd(&Split(plan.clone(), seg)).unwrap())
                })
                .collect();
            let values = value_bits(&qkv)
                .into_iter()
                .chain(value_bits(&plan.tab))
                .chain(u32s(&plan.rows));
            assert_eq!(kernels.run(&header("split"), values), cpu, "split {kind}");

            let g: Vec<Tensor> = plan
                .shapes()
                .iter()
                .map(|&(a, b, c, d)| rnd(&[a, b, c, d]))
                .collect();
            let others: [Tensor; 5] = g[1..].to_vec().try_into().unwrap();
            let cpu = g[0]
                .apply_op1_no_bwd(&JoinGrads(plan.clone(), others))
                .unwrap();
            let values = g
                .iter()
                .flat_map(value_bits)
                .chain(value_bits(&plan.tab))
                .chain(u32s(&plan.resp_off))
                .chain(u32s(&plan.resp_list));
            assert_eq!(
                kernels.run(&header("join"), values),
                value_bits(&cpu),
                "join {kind}"
            );
        }
    }
}
