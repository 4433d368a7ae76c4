//! The decode chain (`dots_moe::cuda::chain`: a whole MoE layer of at most one permutation
//! tile of tokens in three launches) against the separate launches it replaces and against
//! the CPU contract, on every launcher (the CPU emulator, and the GPU when one opens):
//!
//! - bit-identical to the separate pipeline (logits, selection with the fused scatter,
//!   gather, schedule, register decode GEMMs, combine) for T = 1 .. 32, f32 and bf16 hidden
//!   states, bf16 and f32 router weights, the default split and the batch-invariant one;
//! - the routed ids equal to the CPU's, and the output within the bf16 tolerance of the CPU
//!   layer under `Precision::Bf16`;
//! - every intermediate and the output poisoned before each run, the arrival counters left
//!   at 0 by each run (a second run on the same buffers gives the same bits);
//! - planted bugs (the emulator rebuilt from a mutated kernel file): each must change the
//!   output or abort, while the unmutated files pass the same run.
//!
//! Skipped without a C++ compiler (a failure with `DOTS_MOE_REQUIRE_EMULATOR=1`) and
//! without a GPU (a failure with `DOTS_MOE_REQUIRE_GPU=1`).
#![cfg(feature = "cuda")]

mod kernel_support;
mod support;

use dots_moe::config::{MoeConfig, RouterConfig};
use dots_moe::cuda::chain::{self, CombineTargets};
use dots_moe::cuda::expert_gemm::{self, DecodeKernel, GemmOptions, GemmPtrs, ITEM_WORDS, TiledKernel};
use dots_moe::cuda::moe::{self, WorkspaceDims, WorkspacePtrs};
use dots_moe::cuda::source::FILES;
use dots_moe::cuda::{Arch, launch::Launch};
use dots_moe::moe::{MoeLayer, MoeWeights, Precision};
use dots_moe::tensor::{Dtype, TensorView};
use half::bf16;
use kernel_support::{Device, Emu};
use support::gemm::{assert_close, bits, random_f32, rng};

fn config() -> MoeConfig {
    MoeConfig {
        hidden_size: 256,
        moe_intermediate_size: 128,
        n_shared_experts: 2,
        router: RouterConfig { n_experts: 16, top_k: 4, ..RouterConfig::dots1() },
    }
}

fn layer() -> MoeLayer {
    let mut layer = MoeLayer::new(MoeWeights::synthetic(&config(), Dtype::Bf16, 7).unwrap());
    layer.set_precision(Precision::Bf16);
    layer
}

/// Every option set the chain runs under: the first generation's split (register decode
/// kernels, `mma.sync` tiles) and the batch-invariant one.
fn option_sets() -> [(&'static str, GemmOptions); 2] {
    let base = GemmOptions {
        decode: DecodeKernel::Registers,
        tiled: TiledKernel::Mma,
        decode_chain: true,
        ..GemmOptions::for_arch(Arch::SM_80)
    };
    [("default", base), ("batch-invariant", base.batch_invariant())]
}

/// The layer's inputs on one launcher.
struct Inputs {
    hidden: (u64, Dtype),
    gate: (u64, Dtype),
    bias: u64,
    gate_up: u64,
    down: u64,
}

fn upload(dev: &Device, layer: &MoeLayer, hidden: TensorView<'_>, gate_dtype: Dtype) -> Inputs {
    let w = layer.weights();
    let TensorView::Bf16(gate) = w.router_gate() else { panic!("bf16 weights") };
    let gate = match gate_dtype {
        Dtype::Bf16 => (dev.upload(gate), Dtype::Bf16),
        // The exact widening: the CPU's logits are the same either way.
        Dtype::F32 => (dev.upload(&gate.iter().map(|v| v.to_f32()).collect::<Vec<_>>()), Dtype::F32),
    };
    let (TensorView::Bf16(gate_up), TensorView::Bf16(down)) = (w.gate_up(), w.down()) else { panic!("bf16") };
    Inputs {
        hidden: match hidden {
            TensorView::F32(v) => (dev.upload(v), Dtype::F32),
            TensorView::Bf16(v) => (dev.upload(v), Dtype::Bf16),
        },
        gate,
        bias: w.router_bias().map_or(0, |b| dev.upload(b.as_slice())),
        gate_up: dev.upload(gate_up),
        down: dev.upload(down),
    }
}

/// Every buffer of one batch, poisoned; the arrival counters 0.
struct Buffers {
    routing: WorkspacePtrs,
    dims: WorkspaceDims,
    items: GemmPtrs,
    x: u64,
    targets: CombineTargets,
}

impl Buffers {
    fn new(dev: &Device, options: &GemmOptions, tokens: usize) -> Buffers {
        let cfg = config();
        let (e, h, i, s, n_slots) =
            (cfg.router.n_experts, cfg.hidden_size, cfg.moe_intermediate_size, cfg.slots_per_token(), cfg.n_slots());
        let rows = tokens * s;
        let tiles = moe::tiles(tokens);
        let routing = WorkspacePtrs {
            logits: dev.poisoned(4 * tokens * e),
            slot_ids: dev.poisoned(4 * rows),
            slot_weights: dev.poisoned(4 * rows),
            pair_ranks: dev.poisoned(4 * rows),
            tile_counts: dev.poisoned(4 * tiles * n_slots),
            tile_status: dev.poisoned(8 * tiles),
            tile_offsets: dev.poisoned(4 * tiles * n_slots),
            tiles_done: dev.upload(&[0u32]),
            expert_offsets: dev.poisoned(4 * (n_slots + 1)),
            row_pairs: dev.poisoned(4 * rows),
            pair_rows: dev.poisoned(4 * rows),
            row_weights: dev.poisoned(4 * rows),
        };
        let (decode_capacity, tiled_capacity) = options.capacities(rows, n_slots);
        let items = GemmPtrs {
            decode_items: dev.poisoned(4 * ITEM_WORDS * decode_capacity),
            tiled_items: dev.poisoned(4 * ITEM_WORDS * tiled_capacity.max(1)),
            item_counts: dev.poisoned(4 * 3),
            act: dev.poisoned(2 * rows * i),
            decode_capacity,
            tiled_capacity,
            rows,
            n_slots,
        };
        let targets = CombineTargets {
            expert_rows: dev.poisoned(4 * rows * h),
            column_done: dev.upload(&vec![0u32; chain::column_blocks(h)]),
            out: dev.poisoned(4 * tokens * h),
        };
        Buffers {
            routing,
            dims: WorkspaceDims { tokens, slots_per_token: s, n_slots },
            items,
            x: dev.poisoned(2 * rows * h),
            targets,
        }
    }

    /// Poisons every intermediate and the output again (not the counters, not the inputs).
    fn poison(&self, dev: &Device) {
        let cfg = config();
        let (e, h, i) = (cfg.router.n_experts, cfg.hidden_size, cfg.moe_intermediate_size);
        let (t, rows) = (self.dims.tokens, self.items.rows);
        let r = &self.routing;
        for (addr, bytes) in [
            (r.logits, 4 * t * e),
            (r.slot_ids, 4 * rows),
            (r.slot_weights, 4 * rows),
            (r.pair_ranks, 4 * rows),
            (r.expert_offsets, 4 * (self.dims.n_slots + 1)),
            (r.row_pairs, 4 * rows),
            (r.pair_rows, 4 * rows),
            (r.row_weights, 4 * rows),
            (self.items.decode_items, 4 * ITEM_WORDS * self.items.decode_capacity),
            (self.items.item_counts, 12),
            (self.items.act, 2 * rows * i),
            (self.targets.expert_rows, 4 * rows * h),
            (self.targets.out, 4 * t * h),
        ] {
            dev.overwrite(addr, &vec![0xff; bytes]);
        }
    }
}

/// The three launches of the chain.
fn chain_launches(options: &GemmOptions, inputs: &Inputs, b: &Buffers) -> Vec<Launch> {
    let cfg = config();
    let (h, i, s) = (cfg.hidden_size, cfg.moe_intermediate_size, cfg.slots_per_token());
    let t = b.dims.tokens;
    [
        chain::route_launch(
            &cfg.router,
            cfg.n_shared_experts,
            inputs.hidden,
            inputs.gate,
            inputs.bias,
            h,
            &b.routing,
            &b.dims,
            options,
            &b.items,
        )
        .unwrap(),
        chain::up_launch(inputs.hidden, b.routing.row_pairs, s, inputs.gate_up, h, i, &b.items).unwrap(),
        chain::down_launch(inputs.down, b.routing.row_weights, b.routing.pair_rows, &b.targets, t, s, h, i, &b.items)
            .unwrap(),
    ]
    .into_iter()
    .flatten()
    .collect()
}

/// The separate launches the chain replaces (`CudaMoeLayer::enqueue` without the chain).
fn separate_launches(options: &GemmOptions, inputs: &Inputs, b: &Buffers) -> Vec<Launch> {
    let cfg = config();
    let (e, h, i, s) = (cfg.router.n_experts, cfg.hidden_size, cfg.moe_intermediate_size, cfg.slots_per_token());
    let t = b.dims.tokens;
    let mut all = vec![
        moe::logits_launch(inputs.hidden, inputs.gate, b.routing.logits, t, e, h).unwrap(),
        moe::select_launch(&cfg.router, cfg.n_shared_experts, inputs.bias, &b.routing, &b.dims).unwrap(),
        moe::gather_launch(inputs.hidden, b.routing.row_pairs, (b.x, Dtype::Bf16), t, s, h).unwrap(),
        Some(expert_gemm::schedule_launch(options, b.routing.expert_offsets, b.dims.n_slots, &b.items).unwrap()),
    ];
    all.extend(expert_gemm::up_launches(options, b.x, inputs.gate_up, h, i, &b.items).unwrap().into_iter().map(Some));
    all.extend(
        expert_gemm::down_launches(options, inputs.down, b.routing.row_weights, b.targets.expert_rows, h, i, &b.items)
            .unwrap()
            .into_iter()
            .map(Some),
    );
    all.push(moe::combine_launch(b.targets.expert_rows, b.routing.pair_rows, b.targets.out, t, s, h).unwrap());
    all.into_iter().flatten().collect()
}

/// What a run leaves: the output, the slot ids `[T, slots]`, the item counts, the counters.
#[derive(Debug, PartialEq)]
struct Outcome {
    out: Vec<u32>,
    slot_ids: Vec<u32>,
    item_counts: Vec<u32>,
    counters: Vec<u32>,
}

fn run(dev: &Device, launches: Vec<Launch>, b: &Buffers) -> Result<Outcome, String> {
    let h = config().hidden_size;
    for l in launches {
        dev.run(Some(l));
    }
    dev.finish()?;
    let t = b.dims.tokens;
    let mut counters: Vec<u32> = dev.download(b.targets.column_done, chain::column_blocks(h));
    counters.extend(dev.download::<u32>(b.routing.tiles_done, 1));
    Ok(Outcome {
        out: bits(&dev.download::<f32>(b.targets.out, t * h)),
        slot_ids: dev.download(b.routing.slot_ids, t * b.dims.slots_per_token),
        item_counts: dev.download(b.items.item_counts, 3),
        counters,
    })
}

fn hidden_states(tokens: usize, dtype: Dtype, seed: u64) -> (Vec<f32>, Vec<bf16>) {
    let v = random_f32(&mut rng(seed), tokens * config().hidden_size, 1.0);
    let b = v.iter().map(|&x| bf16::from_f32(x)).collect();
    match dtype {
        Dtype::F32 => (v, Vec::new()),
        Dtype::Bf16 => (Vec::new(), b),
    }
}

fn view<'a>(dtype: Dtype, h: &'a (Vec<f32>, Vec<bf16>)) -> TensorView<'a> {
    match dtype {
        Dtype::F32 => TensorView::F32(&h.0),
        Dtype::Bf16 => TensorView::Bf16(&h.1),
    }
}

#[test]
fn the_chain_equals_the_separate_launches_and_the_cpu() {
    let layer = layer();
    let cfg = config();
    let (h, k, s) = (cfg.hidden_size, cfg.router.top_k, cfg.slots_per_token());
    for dev in Device::all("the_chain_equals_the_separate_launches_and_the_cpu") {
        let sizes: &[usize] = dev.pick(&[1, 2, 3, 8, 9, 17, 31, 32], &[1, 3, 9, 32]);
        for &tokens in sizes {
            let combos = [
                (Dtype::F32, Dtype::Bf16),
                (Dtype::Bf16, Dtype::Bf16),
                (Dtype::Bf16, Dtype::F32),
                (Dtype::F32, Dtype::F32),
            ];
            // The emulator's largest batch (its slowest runs) takes two of the four.
            let combos = if !dev.is_gpu() && tokens == chain::CHAIN_MAX_TOKENS { &combos[..2] } else { &combos[..] };
            for &(hidden_dtype, gate_dtype) in combos {
                let host = hidden_states(tokens, hidden_dtype, tokens as u64);
                let trace = layer.forward_trace(view(hidden_dtype, &host), tokens).unwrap();
                for (label, options) in option_sets() {
                    assert!(chain::runs_chain(&options, tokens));
                    let what =
                        format!("{}: T = {tokens}, {hidden_dtype:?} hidden, {gate_dtype:?} gate, {label}", dev.name());
                    let dev = dev.fresh();
                    let inputs = upload(&dev, &layer, view(hidden_dtype, &host), gate_dtype);
                    let separate = Buffers::new(&dev, &options, tokens);
                    let want = run(&dev, separate_launches(&options, &inputs, &separate), &separate).unwrap();
                    let fused = Buffers::new(&dev, &options, tokens);
                    let got = run(&dev, chain_launches(&options, &inputs, &fused), &fused).unwrap();
                    assert_eq!(got.slot_ids, want.slot_ids, "{what}: slot ids");
                    assert_eq!(got.item_counts, want.item_counts, "{what}: item counts");
                    assert!(got.counters.iter().all(|&c| c == 0), "{what}: counters left at {:?}", got.counters);
                    assert!(got.out == want.out, "{what}: the chain's output differs from the separate launches'");
                    // A second run on the same buffers, poisoned again: the counters were reset.
                    fused.poison(&dev);
                    let again = run(&dev, chain_launches(&options, &inputs, &fused), &fused).unwrap();
                    assert!(again == got, "{what}: a second run differs");
                    // Against the CPU contract.
                    for t in 0..tokens {
                        assert_eq!(
                            &got.slot_ids[t * s..t * s + k],
                            trace.routing.ids(t),
                            "{what}: token {t}'s experts"
                        );
                    }
                    let out: Vec<f32> = got.out.iter().map(|&b| f32::from_bits(b)).collect();
                    assert_close(&what, &out, &trace.output);
                    assert_eq!(out.len(), tokens * h);
                }
            }
        }
    }
}

#[test]
fn the_chain_runs_only_where_it_applies() {
    let [(_, options), (_, invariant)] = option_sets();
    assert!(!chain::runs_chain(&options, 0));
    assert!(chain::runs_chain(&options, chain::CHAIN_MAX_TOKENS));
    assert!(!chain::runs_chain(&options, chain::CHAIN_MAX_TOKENS + 1));
    assert!(chain::runs_chain(&invariant, chain::CHAIN_MAX_TOKENS));
    // Off unless asked for; off where the decode regime would not take a shared slot.
    assert!(!chain::runs_chain(&GemmOptions::for_arch(Arch::SM_90A), 1));
    assert!(chain::runs_chain(&GemmOptions::second_generation(), 1));
    let small = GemmOptions { decode_max_rows: 8, ..options };
    assert!(chain::runs_chain(&small, 8));
    assert!(!chain::runs_chain(&small, 9));
    assert!(!chain::runs_chain(&GemmOptions { decode_max_rows: 0, ..options }, 1));
    // More tokens than one tile is a limit error from the launch builders.
    let dims = WorkspaceDims { tokens: 33, slots_per_token: 6, n_slots: 18 };
    let cfg = config();
    let err = chain::route_launch(
        &cfg.router,
        2,
        (16, Dtype::F32),
        (32, Dtype::Bf16),
        0,
        256,
        &WorkspacePtrs::default(),
        &dims,
        &options,
        &GemmPtrs::default(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("tokens of the decode chain"), "{err}");
}

// ---- planted bugs ----------------------------------------------------------------------

/// The emulator of route.cu and expert_gemm_decode.cu with `from` -> `to` applied to `file`
/// (`from` must occur once).
fn mutant(test: &str, file: &str, from: &str, to: &str) -> Option<Emu> {
    kernel_support::emulator(test)?;
    let cxx = kernel_support::compiler_name().expect("the emulator was built, so a compiler exists");
    let texts: Vec<(&str, String)> = FILES
        .iter()
        .filter(|f| f.name == "route.cu" || f.name == "expert_gemm_decode.cu")
        .map(|f| {
            if f.name == file {
                assert_eq!(f.text.matches(from).count(), 1, "{from:?} must occur once in {file}");
                (f.name, f.text.replace(from, to))
            } else {
                (f.name, f.text.to_string())
            }
        })
        .collect();
    let files: Vec<(&str, &str)> = texts.iter().map(|(n, t)| (*n, t.as_str())).collect();
    let binary = kernel_support::build(&cxx, &files, &["-O1"]).unwrap_or_else(|e| panic!("{test}: {e}"));
    Some(Emu::new(&binary))
}

#[test]
fn planted_bugs_in_the_chain_are_caught() {
    let test = "planted_bugs_in_the_chain_are_caught";
    let Some(reference) = kernel_support::emulator(test) else { return };
    let layer = layer();
    let (_, options) = option_sets()[0];
    // 17 tokens: three logit CTAs per expert, several items per column block.
    let tokens = 17;
    let host = hidden_states(tokens, Dtype::F32, 5);
    let chain_on = |dev: &Device| {
        let inputs = upload(dev, &layer, view(Dtype::F32, &host), Dtype::Bf16);
        let b = Buffers::new(dev, &options, tokens);
        let first = run(dev, chain_launches(&options, &inputs, &b), &b)?;
        b.poison(dev);
        let second = run(dev, chain_launches(&options, &inputs, &b), &b)?;
        Ok::<_, String>((first, second))
    };
    let want = chain_on(&Device::Emulator(Emu::new(reference))).unwrap();
    let mutations: [(&str, &str, &str, &str); 5] = [
        (
            "the combine starts one arrival early",
            "expert_gemm_decode.cu",
            "last_tile_to_arrive(column_done + blockIdx.x, n_items)",
            "last_tile_to_arrive(column_done + blockIdx.x, n_items - 1)",
        ),
        (
            "the selection starts one arrival early",
            "route.cu",
            "last_tile_to_arrive(tiles_done, gridDim.x * gridDim.y)",
            "last_tile_to_arrive(tiles_done, gridDim.x * gridDim.y - 1)",
        ),
        (
            "f32 hidden states truncated to bf16 instead of rounded",
            "expert_gemm_decode.cu",
            "return make_uint4(pack_bf16x2(v[0], v[1]),",
            "return make_uint4((__float_as_uint(v[0]) >> 16) | (__float_as_uint(v[1]) & 0xffff0000u),",
        ),
        (
            "the item rows read in permuted order, not through row_pairs",
            "expert_gemm_decode.cu",
            "token[t] = r < rows_valid ? row_pairs[row_begin + r] / slots : 0u;",
            "token[t] = r < rows_valid ? (row_begin + r) / slots : 0u;",
        ),
        (
            "the combine sums a token's slots from its second slot",
            "expert_gemm_decode.cu",
            "const u32* rows = pair_rows + t * slots_per_token;",
            "const u32* rows = pair_rows + t * slots_per_token + 1;",
        ),
    ];
    for (what, file, from, to) in mutations {
        let Some(emu) = mutant(test, file, from, to) else { return };
        let got = chain_on(&Device::Emulator(emu));
        kernel_support::expect_caught(test, what, "", &want, got);
    }
}
