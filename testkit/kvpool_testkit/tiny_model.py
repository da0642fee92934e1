"""Build deterministic random-weight models (a Llama, a DeepSeek-V2, a Gemma 3) and a byte-level BPE tokenizer on
local disk.

No weights can be downloaded on the machines this project is tested on, and greedy decoding of a random model is
still a sharp correctness oracle: any wrong KV entry changes the generated tokens. The same seed and sizes give
byte-identical files, so every process (and every run) sees the same model.

The DeepSeek-V2 presets have the field's attention and experts at toy width: MLA with ``kv_lora_rank`` 512 and
``qk_rope_head_dim`` 64 (the 576-wide latent KV vLLM's CPU MLA backend requires), mixture of experts with shared and
routed experts and a dense first layer, as DeepSeek-V2-Lite.

The Gemma 3 preset is the hybrid-attention class: sliding-window layers alternate with full-attention ones, so vLLM's
hybrid KV cache manager gives it two KV cache groups.

``build_mtp`` writes a DeepSeek-V3 at the same toy width with a multi-token-prediction layer, the drafter of vLLM's MTP
speculative decoding.

Usage: ``python -m kvpool_testkit.tiny_model DIR [--preset tiny|capacity|bench|tiny-mla|bench-mla|tiny-sliding]``.
"""

from __future__ import annotations

import argparse
import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

from filelock import FileLock

_WORDS = (
    "the of and to in is was for on that with as by at from his her an which this are be or it had not "
    "but climate change global agreement energy policy emission target nation finance support technology "
    "transfer president united states question hello answer model cache block memory pool prefill decode "
    "request token river mountain city garden music history science water light stone paper window "
    "market winter summer "
).split()


@dataclass(frozen=True)
class ModelPreset:
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    vocab_size: int
    max_position_embeddings: int
    init_std: float


@dataclass(frozen=True)
class MLAPreset:
    """DeepSeek-V2's shape: latent KV (kv_lora_rank + rope) and experts; first_k_dense_replace dense layers."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    qk_nope_head_dim: int
    v_head_dim: int
    intermediate_size: int
    moe_intermediate_size: int
    n_routed_experts: int
    n_shared_experts: int
    num_experts_per_tok: int
    first_k_dense_replace: int
    vocab_size: int
    max_position_embeddings: int
    init_std: float
    kv_lora_rank: int = 512  # vLLM's CPU MLA backend takes head size 576 only
    qk_rope_head_dim: int = 64
    n_group: int = 1  # expert groups, as V2-Lite (vLLM's CPU router takes grouped top-k only)
    topk_group: int = 1


@dataclass(frozen=True)
class SlidingPreset(ModelPreset):
    """Gemma 3's attention: ``sliding_window`` tokens in every layer but each ``full_every``-th."""

    sliding_window: int = 256
    full_every: int = 2
    head_dim: int = 64


PRESETS: dict[str, ModelPreset | MLAPreset] = {
    # ~4.5 M parameters: builds in seconds, a CPU engine prefills a few thousand tokens per second.
    "tiny": ModelPreset(256, 4, 4, 2, 512, 2048, 8192, 0.05),
    # the tiny model's compute with twice its KV (8 KiB of fp32 KV per token, 1 MiB a block): working sets many
    # times a pool's DRAM in few prefixes, each recomputed in about a second, for the capacity benchmark
    "capacity": ModelPreset(256, 4, 4, 4, 512, 2048, 8192, 0.05),
    # ~78 M parameters, 16 KiB of fp32 KV per token: prefill dominates, for TTFT benchmarks.
    "bench": ModelPreset(1024, 8, 16, 4, 2816, 8192, 8192, 0.02),
    # DeepSeek-V2 at toy width: 3 layers (1 dense, 2 MoE with 4 routed + 1 shared experts, top 2), 2.25 KiB of fp32
    # latent KV per token per layer.
    "tiny-mla": MLAPreset(256, 3, 4, 32, 32, 512, 128, 4, 1, 2, 1, 2048, 8192, 0.05),
    # the same attention with dense layers only: vLLM's CPU MoE kernels take no float32 weights, and float32 keeps
    # greedy decoding stable enough to compare outputs token for token across TP sizes and prefix hits
    "tiny-mla-dense": MLAPreset(256, 3, 4, 32, 32, 512, 128, 4, 1, 2, 3, 2048, 8192, 0.05),
    # wider, for TTFT benchmarks where prefill dominates
    "bench-mla": MLAPreset(1024, 8, 16, 64, 64, 2816, 512, 8, 1, 2, 1, 8192, 8192, 0.02),
    # Gemma 3 at toy width: layers 0 and 2 see the last 256 tokens (two 128-token blocks), 1 and 3 every token
    "tiny-sliding": SlidingPreset(256, 4, 4, 2, 512, 2048, 8192, 0.02),
}


def _corpus(seed: int, lines: int = 4000) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(5, 30))) for _ in range(lines)]


def build_tokenizer(out_dir: Path, vocab_size: int, seed: int = 0) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<s>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(seed), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(out_dir)


def build_model(out_dir: str | Path, preset: str = "tiny", seed: int = 0) -> Path:
    """Write config, safetensors weights and tokenizer to ``out_dir``; a no-op when the same build is there."""
    out = Path(out_dir)
    spec = PRESETS[preset]
    stamp = {"preset": preset, "seed": seed, **asdict(spec)}
    stamp_file = out / "kvpool_tiny_model.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(out.parent / f".{out.name}.lock"):  # test workers running side by side build it once
        if stamp_file.exists() and json.loads(stamp_file.read_text()) == stamp:
            return out
        _build(out, spec, seed)
        stamp_file.write_text(json.dumps(stamp))
    return out


def build_lora(out_dir: str | Path, base: str | Path, seed: int, rank: int = 8, std: float = 0.3) -> Path:
    """A LoRA adapter in PEFT's format for the tiny Llama at ``base``: rank ``rank`` on every layer's ``q_proj`` and
    ``v_proj``, A and B drawn from ``seed`` (B nonzero, unlike a fresh PEFT adapter, so it changes the answers).
    Rewritten on every call: a test may replace an adapter's weights under the same path."""
    import torch
    from safetensors.torch import save_file

    config = json.loads((Path(base) / "config.json").read_text())
    hidden, layers = config["hidden_size"], config["num_hidden_layers"]
    head_dim = hidden // config["num_attention_heads"]
    outputs = {"q_proj": hidden, "v_proj": config["num_key_value_heads"] * head_dim}
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(layers):
        for proj, out_features in outputs.items():
            name = f"base_model.model.model.layers.{layer}.self_attn.{proj}"
            tensors[f"{name}.lora_A.weight"] = torch.randn(rank, hidden, generator=generator) * std
            tensors[f"{name}.lora_B.weight"] = torch.randn(out_features, rank, generator=generator) * std
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    adapter_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(base),
        "r": rank,
        "lora_alpha": 2 * rank,
        "lora_dropout": 0.0,
        "bias": "none",
        "target_modules": sorted(outputs),
    }
    (out / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2))
    return out


def build_eagle(out_dir: str | Path, base: str | Path, seed: int, std: float = 0.05) -> Path:
    """An EAGLE draft head for the tiny Llama at ``base``, in the layout vLLM's ``EagleLlamaForCausalLM`` loads: one
    decoder layer (without the input norm its first layer skips) and ``fc``, which joins the token embedding and the
    target's hidden state; embeddings and ``lm_head`` come from the target. Random weights drawn from ``seed``."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    config = json.loads((Path(base) / "config.json").read_text())
    config.update(num_hidden_layers=1, architectures=["LlamaForCausalLM"])
    torch.manual_seed(seed)
    layer = LlamaForCausalLM(LlamaConfig(**config)).model.layers[0]
    tensors = {
        f"layers.0.{name}": value.detach().clone()
        for name, value in layer.state_dict().items()
        if not name.startswith("input_layernorm")
    }
    hidden = config["hidden_size"]
    tensors["fc.weight"] = torch.randn(hidden, 2 * hidden, generator=torch.Generator().manual_seed(seed)) * std
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


MTP_PRESETS: dict[str, MLAPreset] = {
    # DeepSeek-V3 at toy width with its next-token-prediction layer: the tiny-mla attention, 3 dense layers and a
    # dense MTP layer (``first_k_dense_replace`` past every layer, the MTP layer's index 3 included): vLLM's CPU MoE
    # kernels take no float32 weights, and float32 keeps greedy answers comparable token for token
    "tiny-mtp": MLAPreset(256, 3, 4, 32, 32, 512, 128, 4, 1, 2, 4, 2048, 8192, 0.05),
}


def build_mtp(out_dir: str | Path, preset: str = "tiny-mtp", seed: int = 0, num_mtp_layers: int = 1) -> Path:
    """A DeepSeek-V3 checkpoint with ``num_mtp_layers`` multi-token-prediction layers, in the layout vLLM's
    ``DeepSeekMTP`` loads (``speculative_config={"method": "mtp"}``; vLLM maps only ``deepseek_v3``/``v32`` configs to
    it, not V2): config ``num_nextn_predict_layers``, and at ``model.layers.{num_hidden_layers + i}.`` a decoder layer
    plus ``enorm``, ``hnorm``, ``eh_proj`` (joins the normed token embedding and the target's hidden state) and
    ``shared_head`` (``norm``; ``head``, a copy of ``lm_head`` as in DeepSeek-V3's checkpoints). The target model
    ignores those weights. Random weights drawn from ``seed``; byte-identical on every call, built once per folder (a
    no-op when the same build is there)."""
    out = Path(out_dir)
    spec = MTP_PRESETS[preset]
    stamp = {"preset": preset, "seed": seed, "num_mtp_layers": num_mtp_layers, **asdict(spec)}
    stamp_file = out / "kvpool_tiny_model.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(out.parent / f".{out.name}.lock"):
        if stamp_file.exists() and json.loads(stamp_file.read_text()) == stamp:
            return out
        _build_mtp(out, spec, seed, num_mtp_layers)
        stamp_file.write_text(json.dumps(stamp))
    return out


def _build_mtp(out: Path, spec: MLAPreset, seed: int, num_mtp_layers: int) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    out.mkdir(parents=True, exist_ok=True)
    build_tokenizer(out, spec.vocab_size, seed)
    layers = spec.num_hidden_layers

    def config(num_hidden_layers: int) -> DeepseekV3Config:
        common = _common(spec) | {"num_hidden_layers": num_hidden_layers}
        return DeepseekV3Config(
            **_mla_args(spec),
            num_nextn_predict_layers=num_mtp_layers,
            **common,
        )

    torch.manual_seed(seed)
    # The MTP layers' decoder blocks drawn as further layers of the same model, then given the MTP parts.
    model = DeepseekV3ForCausalLM(config(layers + num_mtp_layers))
    tensors = {name: value.detach().clone().contiguous() for name, value in model.state_dict().items()}
    generator = torch.Generator().manual_seed(seed + 1)
    hidden = spec.hidden_size
    for i in range(layers, layers + num_mtp_layers):
        prefix = f"model.layers.{i}."
        tensors[f"{prefix}enorm.weight"] = torch.ones(hidden)
        tensors[f"{prefix}hnorm.weight"] = torch.ones(hidden)
        tensors[f"{prefix}eh_proj.weight"] = torch.randn(hidden, 2 * hidden, generator=generator) * spec.init_std
        tensors[f"{prefix}shared_head.norm.weight"] = torch.ones(hidden)
        tensors[f"{prefix}shared_head.head.weight"] = tensors["lm_head.weight"].clone()
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    target = config(layers)
    target.architectures = ["DeepseekV3ForCausalLM"]
    target.save_pretrained(out)


def _build(out: Path, spec: ModelPreset | MLAPreset | SlidingPreset, seed: int) -> None:
    import torch

    out.mkdir(parents=True, exist_ok=True)
    build_tokenizer(out, spec.vocab_size, seed)
    torch.manual_seed(seed)
    if isinstance(spec, MLAPreset):
        model = _deepseek_v2(spec)
    elif isinstance(spec, SlidingPreset):
        model = _gemma3(spec)
    else:
        model = _llama(spec)
    model.save_pretrained(out, safe_serialization=True)


def _common(spec: ModelPreset | MLAPreset) -> dict:
    """Config arguments both architectures take alike."""
    return dict(
        hidden_size=spec.hidden_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        intermediate_size=spec.intermediate_size,
        vocab_size=spec.vocab_size,
        max_position_embeddings=spec.max_position_embeddings,
        initializer_range=spec.init_std,
        bos_token_id=0,
        eos_token_id=1,
        tie_word_embeddings=False,
        torch_dtype="float32",
    )


def _llama(spec: ModelPreset):
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(num_key_value_heads=spec.num_key_value_heads, **_common(spec)))


def _gemma3(spec: SlidingPreset):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    layer_types = [
        "full_attention" if (i + 1) % spec.full_every == 0 else "sliding_attention"
        for i in range(spec.num_hidden_layers)
    ]
    config = Gemma3TextConfig(
        num_key_value_heads=spec.num_key_value_heads,
        head_dim=spec.head_dim,
        sliding_window=spec.sliding_window,
        layer_types=layer_types,
        pad_token_id=2,
        **_common(spec),
    )
    return Gemma3ForCausalLM(config)


def _deepseek_v2(spec: MLAPreset):
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM

    config = DeepseekV2Config(**_mla_args(spec), topk_method="greedy", **_common(spec))
    return DeepseekV2ForCausalLM(config)


def _mla_args(spec: MLAPreset) -> dict:
    """The DeepSeek attention (MLA) and MoE settings V2 and V3 configs share."""
    return {
        "num_key_value_heads": spec.num_attention_heads,
        "kv_lora_rank": spec.kv_lora_rank,
        "q_lora_rank": None,  # as V2-Lite: queries are not compressed
        "qk_nope_head_dim": spec.qk_nope_head_dim,
        "qk_rope_head_dim": spec.qk_rope_head_dim,
        "v_head_dim": spec.v_head_dim,
        "moe_intermediate_size": spec.moe_intermediate_size,
        "n_routed_experts": spec.n_routed_experts,
        "n_shared_experts": spec.n_shared_experts,
        "num_experts_per_tok": spec.num_experts_per_tok,
        "first_k_dense_replace": spec.first_k_dense_replace,
        "n_group": spec.n_group,
        "topk_group": spec.topk_group,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(build_model(args.out_dir, args.preset, args.seed))


if __name__ == "__main__":
    main()
