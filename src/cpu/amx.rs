//! AMX (Advanced Matrix Extensions) bf16 kernel: `TDPBF16PS` on 16 x 16 f32 tiles
//! (x86_64 Linux; Sapphire Rapids and later).
//!
//! `out = a * w^T` is computed transposed, tile by tile: the weight rows are the tiles'
//! `A` operand (16 rows of `w`, 32 bf16 of `k` each, loaded in place from the row-major
//! weights with the row pitch as stride), and the activations are the `B` operand,
//! packed once per call into the pair-interleaved layout the instruction reads
//! ([`AmxA`]: per block of 16 rows of `a` and chunk of 32 of `k`, a 1 KiB tile whose row
//! `r` holds the pair `(2r, 2r + 1)` of every row). An accumulator tile is 16 weight rows
//! by 16 activation rows; its values are transposed when they are handed to the sink.
//!
//! # Numerics (batch invariance)
//!
//! Every output element has one f32 accumulator in a tile register that walks `k` in
//! chunks of 32 from 0 upwards, each chunk adding its 16 bf16 pair products as
//! `TDPBF16PS` does (exact products, f32 sums, round to nearest even, denormals flushed).
//! The instruction computes each element from its own row of `a` and row of `w` only, so
//! `out[i][j]` depends on `(a[i, :], w[j, :], k)` alone: the rows padded with zeros in a
//! block, the position of a row in its block, the tile and the thread change nothing.
//! The kernel runs for bf16 `a` and `w` with `k` a multiple of 32 (every dots.llm1
//! matrix); the plans use `avx512::tile_bf16` otherwise, a choice that depends on `k`
//! only.
//!
//! # Blocking
//!
//! Per task, the output columns are walked in groups of two weight tiles (32 columns, or
//! 16 gate/up pairs), each group's weight rows read from memory once; inside a group,
//! the activation blocks go two at a time: 4 accumulators, 2 weight tiles and 2
//! activation tiles, the 8 tile registers. Per chunk of `k`: 4 tile loads, 4
//! `TDPBF16PS` (16 x 16 x 32 multiply-adds each).

use std::arch::asm;
use std::ops::Range;
use std::sync::OnceLock;

use super::driver::Sink;
use super::plan::Cols;
use super::rows::{AlignedRows, Line};

/// Rows of `a` per activation tile, and weight rows per weight tile.
pub(crate) const TILE: usize = 16;
/// Elements of `k` per tile chunk (32 bf16: one 64-byte tile row).
pub(crate) const CHUNK: usize = 32;
/// `u32` pairs per packed tile (16 pair-rows of 16 activation rows).
const TILE_WORDS: usize = TILE * TILE;
/// Bytes of one tile (16 rows of 64 bytes).
const TILE_BYTES: usize = 4 * TILE_WORDS;

/// Whether this CPU has AMX-BF16 and AMX-TILE and the kernel may use them: the CPU says
/// so (CPUID leaf 7), `avx512bf16` is present (the plans fall back to its kernel), and
/// Linux granted this process the tile data state (`arch_prctl(ARCH_REQ_XCOMP_PERM)`),
/// which it must ask for before the first tile instruction. Asked once, cached.
pub(crate) fn available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(|| cpu_has_amx_bf16() && is_x86_feature_detected!("avx512bf16") && request_tile_data())
}

/// CPUID.(EAX=7, ECX=0):EDX bit 22 (AMX-BF16) and bit 24 (AMX-TILE).
fn cpu_has_amx_bf16() -> bool {
    use std::arch::x86_64::{__cpuid, __cpuid_count};
    #[allow(unused_unsafe)] // `__cpuid*` are unsafe fns on older toolchains, safe on newer
    // SAFETY: CPUID exists on every x86_64 CPU; leaf 7 is only read when leaf 0 lists it.
    let edx = unsafe { if __cpuid(0).eax >= 7 { __cpuid_count(7, 0).edx } else { 0 } };
    edx & (1 << 22) != 0 && edx & (1 << 24) != 0
}

/// Asks Linux for the AMX tile data state (`arch_prctl(ARCH_REQ_XCOMP_PERM,
/// XFEATURE_XTILEDATA)`); true if granted. Without it the first tile load faults.
#[cfg(target_os = "linux")]
fn request_tile_data() -> bool {
    const SYS_ARCH_PRCTL: i64 = 158;
    const ARCH_REQ_XCOMP_PERM: i64 = 0x1023;
    const XFEATURE_XTILEDATA: i64 = 18;
    let ret: i64;
    // SAFETY: a plain system call that only changes this process's permitted xstate
    // features; it reads and writes no memory of ours. `syscall` clobbers rcx and r11.
    unsafe {
        asm!(
            "syscall",
            inlateout("rax") SYS_ARCH_PRCTL => ret,
            in("rdi") ARCH_REQ_XCOMP_PERM,
            in("rsi") XFEATURE_XTILEDATA,
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack),
        );
    }
    ret == 0
}

#[cfg(not(target_os = "linux"))]
fn request_tile_data() -> bool {
    false
}

/// Whether the AMX kernel takes a bf16 x bf16 product over `k` (see the module docs).
pub(crate) fn takes(k: usize) -> bool {
    k > 0 && k.is_multiple_of(CHUNK)
}

/// `a [m, k]` packed as the tiles' `B` operand: tile `(block, chunk)` is row
/// `block * chunks + chunk` of the storage, 256 `u32` words, word `r * 16 + t` holding
/// the bf16 pair `(a[16 block + t][32 chunk + 2r], ..[+ 1])` (low half first); rows past
/// `m` are zeros. Owned, or in storage the caller keeps from call to call.
pub(crate) struct AmxA<'a> {
    tiles: AlignedRows<'a, u32>,
    chunks: usize,
}

impl AmxA<'static> {
    /// Packs the `m` rows `row(i)` (bf16 bits, at least `k` each; `k` a multiple of
    /// [`CHUNK`]) into owned storage.
    pub(crate) fn pack<'r>(m: usize, k: usize, row: impl Fn(usize) -> &'r [u16]) -> Self {
        let (blocks, chunks) = (m.div_ceil(TILE), k / CHUNK);
        let mut tiles = AlignedRows::new(blocks * chunks, TILE_WORDS);
        let stride = tiles.stride();
        fill(tiles.all_mut(), stride, m, k, row);
        AmxA { tiles, chunks }
    }
}

impl<'a> AmxA<'a> {
    /// Cache lines [`AmxA::pack_into`] needs for `m` rows of `k`.
    pub(crate) fn lines_needed(m: usize, k: usize) -> usize {
        AlignedRows::<u32>::lines_needed(m.div_ceil(TILE) * (k / CHUNK), TILE_WORDS)
    }

    /// [`AmxA::pack`] into `lines` (at least [`AmxA::lines_needed`] of them).
    pub(crate) fn pack_into<'r>(lines: &'a mut [Line], m: usize, k: usize, row: impl Fn(usize) -> &'r [u16]) -> Self {
        let (blocks, chunks) = (m.div_ceil(TILE), k / CHUNK);
        let need = Self::lines_needed(m, k);
        let stride = AlignedRows::<u32>::stride_for(TILE_WORDS);
        fill(bytemuck::cast_slice_mut(&mut lines[..need]), stride, m, k, row);
        AmxA { tiles: AlignedRows::borrowed(lines, blocks * chunks, TILE_WORDS), chunks }
    }

    /// The first tile of block `b`; the block's chunks follow at [`AmxA::tile_stride`].
    fn block(&self, b: usize) -> *const u32 {
        self.tiles.row(b * self.chunks).as_ptr()
    }

    /// `u32` words from one chunk's tile to the next of the same block.
    fn tile_stride(&self) -> usize {
        self.tiles.stride()
    }
}

/// Writes the tiles of [`AmxA`] for the `m` rows `row(i)` into `words`, tile `n` at
/// `n * stride`.
fn fill<'r>(words: &mut [u32], stride: usize, m: usize, k: usize, row: impl Fn(usize) -> &'r [u16]) {
    debug_assert!(takes(k));
    let (blocks, chunks) = (m.div_ceil(TILE), k / CHUNK);
    for b in 0..blocks {
        // The block's rows as bf16 pairs (one `u32` per pair, low half first).
        let src: [Option<&[u32]>; TILE] = std::array::from_fn(|t| {
            let i = b * TILE + t;
            (i < m).then(|| bytemuck::cast_slice(&row(i)[..k]))
        });
        for c in 0..chunks {
            let n = b * chunks + c;
            let dst = &mut words[n * stride..n * stride + TILE_WORDS];
            // SAFETY: the AMX plans run only where `available()` held (AVX-512 F present);
            // every row holds `16 * chunks` pairs and `dst` 256 words.
            unsafe { transpose_tile(&src, c * TILE, dst) };
        }
    }
}

/// Writes `dst[r * 16 + t] = src[t][off + r]` for `r, t < 16` (zeros for absent rows):
/// the 16 x 16 transpose of 32-bit words that lays 16 rows' pairs out as a `B` tile.
///
/// # Safety
/// The CPU must support AVX-512 F; every present row must hold `off + 16` words and
/// `dst` 256.
#[target_feature(enable = "avx512f")]
unsafe fn transpose_tile(src: &[Option<&[u32]>; TILE], off: usize, dst: &mut [u32]) {
    use std::arch::x86_64::*;
    assert!(dst.len() >= TILE_WORDS);
    let r: [__m512i; TILE] = std::array::from_fn(|t| match src[t] {
        // SAFETY: the row holds `off + 16` words (asserted by the slice index).
        Some(row) => unsafe { _mm512_loadu_si512(row[off..off + TILE].as_ptr().cast()) },
        None => _mm512_setzero_si512(),
    });
    // Pairs of rows interleaved by word, then by pairs of words: `u[4g + j]`, 128-bit
    // lane `l`, holds rows `4g..4g + 4` of column `4l + j`.
    let t: [__m512i; TILE] = std::array::from_fn(|i| {
        let (a, b) = (r[i & !1], r[i | 1]);
        if i % 2 == 0 { _mm512_unpacklo_epi32(a, b) } else { _mm512_unpackhi_epi32(a, b) }
    });
    let u: [__m512i; TILE] = std::array::from_fn(|i| {
        let (g, j) = (i / 4, i % 4);
        let (a, b) = (t[4 * g + j / 2], t[4 * g + 2 + j / 2]);
        if j % 2 == 0 { _mm512_unpacklo_epi64(a, b) } else { _mm512_unpackhi_epi64(a, b) }
    });
    for j in 0..4 {
        // Lanes of the four row groups gathered: output row `4l + j` is lane `l` of
        // `u[j]`, `u[4 + j]`, `u[8 + j]`, `u[12 + j]`.
        let p0 = _mm512_shuffle_i32x4::<0x44>(u[j], u[4 + j]);
        let p1 = _mm512_shuffle_i32x4::<0xEE>(u[j], u[4 + j]);
        let q0 = _mm512_shuffle_i32x4::<0x44>(u[8 + j], u[12 + j]);
        let q1 = _mm512_shuffle_i32x4::<0xEE>(u[8 + j], u[12 + j]);
        let out = [
            _mm512_shuffle_i32x4::<0x88>(p0, q0),
            _mm512_shuffle_i32x4::<0xDD>(p0, q0),
            _mm512_shuffle_i32x4::<0x88>(p1, q1),
            _mm512_shuffle_i32x4::<0xDD>(p1, q1),
        ];
        for (l, v) in out.into_iter().enumerate() {
            let row = 4 * l + j;
            // SAFETY: `dst` holds 256 words (asserted); this writes words `16 row..+16`.
            unsafe { _mm512_storeu_si512(dst[row * TILE..].as_mut_ptr().cast(), v) };
        }
    }
}

/// The tile configuration: palette 1, the 8 tiles each 16 rows of 64 bytes.
#[repr(C, align(64))]
struct TileConfig([u8; 64]);

impl TileConfig {
    const fn full() -> Self {
        let mut c = [0u8; 64];
        c[0] = 1; // palette
        let mut t = 0;
        while t < 8 {
            c[16 + 2 * t] = 64; // colsb (u16, little endian)
            c[48 + t] = TILE as u8; // rows
            t += 1;
        }
        TileConfig(c)
    }
}

static CONFIG: TileConfig = TileConfig::full();

/// Loaded tile configuration for the current thread, released on drop (also on unwind).
struct TileGuard;

impl TileGuard {
    /// # Safety
    /// [`available`] must have returned true.
    unsafe fn load() -> Self {
        // SAFETY: AMX is available and permitted (caller); the config is 64 valid bytes.
        unsafe { asm!("ldtilecfg [{c}]", c = in(reg) CONFIG.0.as_ptr(), options(nostack, readonly)) };
        TileGuard
    }
}

impl Drop for TileGuard {
    fn drop(&mut self) {
        // SAFETY: a configuration was loaded by `TileGuard::load` on this thread.
        unsafe { asm!("tilerelease", options(nostack, nomem)) };
    }
}

/// Accumulators of one tile block, stored: `[acc][weight row][activation row]`, where
/// `acc = 2 * weight tile + activation tile`.
type Stored = [[f32; TILE_WORDS]; 4];

/// Where a tile block reads its two weight tiles: 16 rows each, `stride` bytes apart, the
/// next chunk `step` bytes further on. In place in `w` (`stride = 2k`, `step = 64`), or
/// from a copy packed tile by tile (`stride = 64`, `step = 2048`, the second tile 1 KiB
/// after the first): rows 2k apart share one L1 set when `2k` is a multiple of 4 KiB, and
/// 32 of them miss L1 on every load, while a packed tile is 1 KiB in a row.
#[derive(Clone, Copy)]
struct WeightTiles {
    w0: *const u8,
    w1: *const u8,
    stride: usize,
    step: usize,
}

/// Computes the accumulators of the weight tiles `w` against the activation blocks `b0`
/// and, when `two`, `b1`, over `chunks` chunks (`b_stride` words between a block's
/// chunks), and stores them into `out`. When `keep` is not null, the weight tiles are
/// also stored there packed (chunk `c` at `keep + 2048 c`, see [`WeightTiles`]).
///
/// # Safety
/// A tile configuration must be loaded ([`TileGuard`]); the weight tiles must be readable
/// for `chunks` chunks, the blocks for `chunks` tiles, `keep` (if not null) writable for
/// `2048 * chunks` bytes.
#[allow(clippy::too_many_arguments)] // the operands of one tile block
unsafe fn tile_block(
    w: WeightTiles,
    b0: *const u32,
    b1: *const u32,
    b_stride: usize,
    chunks: usize,
    two: bool,
    keep: *mut u8,
    out: &mut Stored,
) {
    // SAFETY (every asm block): tiles configured (caller); every load reads 16 rows of 64
    // bytes inside the ranges the caller vouches for; the stores write `keep` and `out`.
    unsafe {
        asm!("tilezero tmm0", "tilezero tmm1", "tilezero tmm2", "tilezero tmm3", options(nostack, nomem));
        let in_place = w.stride != 64;
        for c in 0..chunks {
            let (w0, w1) = (w.w0.add(c * w.step), w.w1.add(c * w.step));
            let (b0, b1) = (b0.add(c * b_stride), b1.add(c * b_stride));
            if in_place {
                prefetch_rows(w0.cast(), w.stride / 2);
                prefetch_rows(w1.cast(), w.stride / 2);
            }
            asm!(
                "tileloadd tmm4, [{w0} + {ws}*1]",
                "tileloadd tmm5, [{w1} + {ws}*1]",
                w0 = in(reg) w0, w1 = in(reg) w1, ws = in(reg) w.stride,
                options(nostack, readonly),
            );
            if !keep.is_null() {
                let k0 = keep.add(c * 2 * TILE_BYTES);
                asm!(
                    "tilestored [{k0} + {s}*1], tmm4",
                    "tilestored [{k1} + {s}*1], tmm5",
                    k0 = in(reg) k0, k1 = in(reg) k0.add(TILE_BYTES), s = in(reg) 64usize,
                    options(nostack),
                );
            }
            if two {
                asm!(
                    "tileloadd tmm6, [{b0} + {bs}*1]",
                    "tileloadd tmm7, [{b1} + {bs}*1]",
                    "tdpbf16ps tmm0, tmm4, tmm6",
                    "tdpbf16ps tmm1, tmm4, tmm7",
                    "tdpbf16ps tmm2, tmm5, tmm6",
                    "tdpbf16ps tmm3, tmm5, tmm7",
                    b0 = in(reg) b0, b1 = in(reg) b1, bs = in(reg) 64usize,
                    options(nostack, readonly),
                );
            } else {
                asm!(
                    "tileloadd tmm6, [{b0} + {bs}*1]",
                    "tdpbf16ps tmm0, tmm4, tmm6",
                    "tdpbf16ps tmm2, tmm5, tmm6",
                    b0 = in(reg) b0, bs = in(reg) 64usize,
                    options(nostack, readonly),
                );
            }
        }
        let o = out.as_mut_ptr().cast::<f32>();
        asm!(
            "tilestored [{o0} + {s}*1], tmm0",
            "tilestored [{o1} + {s}*1], tmm1",
            "tilestored [{o2} + {s}*1], tmm2",
            "tilestored [{o3} + {s}*1], tmm3",
            o0 = in(reg) o,
            o1 = in(reg) o.add(TILE_WORDS),
            o2 = in(reg) o.add(2 * TILE_WORDS),
            o3 = in(reg) o.add(3 * TILE_WORDS),
            s = in(reg) 64usize,
            options(nostack),
        );
    }
}

thread_local! {
    /// The packed weight tiles of [`drive`], kept per thread from call to call.
    static PACKED_W: std::cell::Cell<Vec<Line>> = const { std::cell::Cell::new(Vec::new()) };
}

/// Bytes of packed activation blocks per row panel of [`drive`]: with a column group's
/// weight rows (`64 k` bytes) they stay in the 2 MiB L2 while the group's tiles run.
/// Streaming them from L3 instead measured 3x slower (k = 4096, m = 256).
const PANEL_BYTES: usize = 1 << 20;

/// Elements of `k` that [`tile_single`] prefetches ahead of the chunk it multiplies.
const PREFETCH_AHEAD: usize = 4 * CHUNK;

/// Prefetches into L1 the line [`PREFETCH_AHEAD`] elements past `w` in each of the 16
/// rows (`k` elements apart) of a weight tile streamed from memory: the hardware
/// prefetchers follow 16 rows that each advance 64 bytes per chunk too slowly on their
/// own. (A two-block kernel reading the packed copy from L2 runs faster without it.)
#[inline(always)]
fn prefetch_rows(w: *const u16, k: usize) {
    use std::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
    for r in 0..TILE {
        // SAFETY: prefetching is a hint that never faults, whatever the address.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(w.wrapping_add(r * k + PREFETCH_AHEAD).cast::<i8>()) };
    }
}

/// Prefetches into L2 the line at `w` of each of the 16 rows of the weight tile that
/// runs next, one line per row and chunk of this one: its rows start streaming before
/// it begins (the role of `driver::drive`'s block prefetch in the AVX-512 kernels).
#[inline(always)]
fn prefetch_next(w: *const u16, k: usize) {
    use std::arch::x86_64::{_MM_HINT_T1, _mm_prefetch};
    for r in 0..TILE {
        // SAFETY: prefetching is a hint that never faults, whatever the address.
        unsafe { _mm_prefetch::<_MM_HINT_T1>(w.wrapping_add(r * k).cast::<i8>()) };
    }
}

/// One weight tile at `w0` against one activation block `b0`, into `out`: the kernel for
/// a single block of rows (decode, small slots), where the weights stream from memory
/// and one tile's 16 rows at a time, each prefetched a few lines ahead, keep the memory
/// busier than two tiles' 32 rows (measured about 15% faster at `m = 1` on 2 threads).
/// The values are those of [`tile_block`]: the same chain per element.
///
/// # Safety
/// As [`tile_block`] for one weight tile and one block.
unsafe fn tile_single(
    w0: *const u16,
    w_stride: usize,
    b0: *const u32,
    b_stride: usize,
    chunks: usize,
    next: Option<*const u16>,
    out: &mut [f32],
) {
    debug_assert!(out.len() >= TILE_WORDS);
    let k = w_stride / 2;
    // SAFETY (every asm block): as for `tile_block`; prefetching never faults.
    unsafe {
        asm!("tilezero tmm0", options(nostack, nomem));
        for c in 0..chunks {
            let w = w0.add(c * CHUNK);
            prefetch_rows(w, k);
            if let Some(next) = next {
                prefetch_next(next.wrapping_add(c * CHUNK), k);
            }
            asm!(
                "tileloadd tmm4, [{w} + {ws}*1]",
                "tileloadd tmm6, [{b} + {bs}*1]",
                "tdpbf16ps tmm0, tmm4, tmm6",
                w = in(reg) w, ws = in(reg) w_stride, b = in(reg) b0.add(c * b_stride), bs = in(reg) 64usize,
                options(nostack, readonly),
            );
        }
        asm!("tilestored [{o} + {s}*1], tmm0", o = in(reg) out.as_mut_ptr(), s = in(reg) 64usize, options(nostack));
    }
}

/// Computes rows `rows` x output columns `cols` of `a * w^T` (`w [_, k]` bf16 bits,
/// columns mapped to rows of `w` by `mode`) and hands every value to `sink` once.
///
/// # Safety
/// [`available`] must have returned true; the sink access is as for `PackedA::run`;
/// `rows` must lie within the rows `a` was packed with, and the `w` rows `cols` maps to
/// inside `w`.
pub(crate) unsafe fn drive<S: Sink>(
    a: &AmxA<'_>,
    w: &[u16],
    k: usize,
    mode: Cols,
    rows: Range<usize>,
    cols: Range<usize>,
    sink: &S,
) {
    if rows.is_empty() || cols.is_empty() {
        return;
    }
    let w_rows = w.len() / k;
    // Output columns per group, and the first `w` row of each of its two weight tiles.
    let (group, second) = match mode {
        Cols::Plain => (2 * TILE, None),
        Cols::Paired { second } => (TILE, Some(second)),
    };
    let starts = |j: usize| [j, second.map_or(j + TILE, |s| s + j)];
    // Weight tiles that would run past the last row of `w` read a zero-padded copy.
    let mut tail = [Vec::new(), Vec::new()];
    let (first_block, end_block) = (rows.start / TILE, rows.end.div_ceil(TILE));
    let b_stride = a.tile_stride();
    let mut out: Box<Stored> = Box::new([[0.0; TILE_WORDS]; 4]);
    let mut by_row = [[0.0f32; TILE_WORDS]; 2];
    // SAFETY: AMX is available (caller).
    let _tiles = unsafe { TileGuard::load() };
    // Row panels: the packed blocks of a panel stay in L2 (about `PANEL_BYTES`) while
    // every column group of the task runs over them; one panel when the rows fit.
    let panel = (PANEL_BYTES / (TILE * 2 * k)).max(2) & !1;
    let single = end_block - first_block == 1;
    // A column group's two weight tiles, packed (`WeightTiles`), for the blocks of a panel:
    // this thread's buffer from the last call (a fresh 256 KiB per call costs page faults).
    let mut packed_w = PACKED_W.take();
    if !single && packed_w.len() < a.chunks * 2 * TILE_BYTES / 64 {
        packed_w.resize(a.chunks * 2 * TILE_BYTES / 64, Line([0; 64]));
    }
    for p0 in (first_block..end_block).step_by(panel) {
        let p1 = (p0 + panel).min(end_block);
        for j in cols.clone().step_by(group) {
            let n = group.min(cols.end - j);
            let ptrs = std::array::from_fn::<_, 2, _>(|t| {
                let r0 = starts(j)[t];
                if r0 + TILE <= w_rows {
                    w[r0 * k..].as_ptr()
                } else {
                    let buf = &mut tail[t];
                    buf.clear();
                    buf.resize(TILE * k, 0u16);
                    let have = w_rows.saturating_sub(r0).min(TILE);
                    if have > 0 {
                        buf[..have * k].copy_from_slice(&w[r0 * k..(r0 + have) * k]);
                    }
                    buf.as_ptr()
                }
            });
            let mut b = p0;
            while b < p1 {
                let two = b + 1 < p1;
                let b1 = if two { a.block(b + 1) } else { a.block(b) };
                // SAFETY (both): tiles configured above; the weight pointers cover 16 rows of
                // `k` (in `w`, or the padded copy), the blocks `a.chunks` tiles each.
                if single {
                    // The weight tile after each: the group's second, then the next group's
                    // first (when it lies in `w`).
                    let after = j + group;
                    let next_group = (after < cols.end && starts(after)[0] + TILE <= w_rows)
                        .then(|| w[starts(after)[0] * k..].as_ptr());
                    for (t, &p) in ptrs.iter().enumerate() {
                        if t == 0 || n > TILE || second.is_some() {
                            let next = if t == 0 { Some(ptrs[1]) } else { next_group };
                            unsafe { tile_single(p, 2 * k, a.block(b), b_stride, a.chunks, next, &mut out[2 * t]) };
                        }
                    }
                } else {
                    // The first tile block of a group in a panel with more reads the weights
                    // in place and keeps them packed; the later ones read the packed copy.
                    let (tiles, keep) = if b == p0 {
                        let keep = if p1 - p0 > 2 { packed_w.as_mut_ptr().cast::<u8>() } else { std::ptr::null_mut() };
                        let (w0, w1) = (ptrs[0].cast(), ptrs[1].cast());
                        (WeightTiles { w0, w1, stride: 2 * k, step: 2 * CHUNK }, keep)
                    } else {
                        let w0 = packed_w.as_ptr().cast::<u8>();
                        // SAFETY: `packed_w` holds `2 * TILE_BYTES * a.chunks` bytes.
                        let w1 = unsafe { w0.add(TILE_BYTES) };
                        (WeightTiles { w0, w1, stride: 64, step: 2 * TILE_BYTES }, std::ptr::null_mut())
                    };
                    unsafe { tile_block(tiles, a.block(b), b1, b_stride, a.chunks, two, keep, &mut out) };
                }
                for bt in 0..if two { 2 } else { 1 } {
                    // The block's two accumulators (weight tile 0 and 1) transposed: row `t`
                    // of `by_row[w]` holds token `t`'s 16 values of weight tile `w`.
                    for w in 0..2 {
                        let src: [Option<&[u32]>; TILE] = std::array::from_fn(|jj| {
                            Some(bytemuck::cast_slice(&out[2 * w + bt][jj * TILE..(jj + 1) * TILE]))
                        });
                        // SAFETY: AVX-512 F is present (`available()`); each row holds 16 words
                        // and the destination 256.
                        unsafe { transpose_tile(&src, 0, bytemuck::cast_slice_mut(&mut by_row[w])) };
                    }
                    for t in 0..TILE {
                        let i = (b + bt) * TILE + t;
                        if !rows.contains(&i) {
                            continue;
                        }
                        let [first, second] = [0, 1].map(|w| &by_row[w][t * TILE..(t + 1) * TILE]);
                        // SAFETY: the caller owns these elements for the call.
                        unsafe {
                            match mode {
                                Cols::Plain => {
                                    sink.put(i, j, &first[..n.min(TILE)], &[]);
                                    if n > TILE {
                                        sink.put(i, j + TILE, &second[..n - TILE], &[]);
                                    }
                                }
                                Cols::Paired { .. } => sink.put(i, j, &first[..n], &second[..n]),
                            }
                        }
                    }
                }
                b += if two { 2 } else { 1 };
            }
        }
    }
    PACKED_W.set(packed_w);
}
