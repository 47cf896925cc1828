"""Tiny causal LMs and T5s with random weights, materialized once as standard Hugging Face model dirs.

The directory (config, safetensors weights, a byte-level BPE tokenizer built in code) loads
with `AutoModelForCausalLM.from_pretrained` (T5: `AutoModelForSeq2SeqLM`) anywhere, so external tools (lm-evaluation-harness,
vLLM, PEFT) see the very same model. Its name carries a hash of the config: same config, same dir.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

FORMAT_VERSION = 1
SPECIALS = ["<|endoftext|>", "<bos>", "<pad>"]

# A fixed corpus for the BPE merges: enough English for word-like tokens, no data dependency.
_CORPUS = """\
Question: Which of the following is the best answer to the question below?
Answer: The answer is the one that explains why the water boils when it is heated.
A student wants to know how plants grow in the light, so she measures the height every day.
The man went to the store to buy some bread, milk and eggs for breakfast in the morning.
Scientists observe that the Earth rotates on its axis once every day and orbits the Sun every year.
How do I clean a glass table without leaving streaks? Use a soft cloth and warm water with vinegar.
Is the passage true or false? Yes, the statement is true. No, the statement is false.
She could not lift the box because it was too heavy, so he helped her carry it into the house.
Energy from the sun is stored by producers such as green plants through photosynthesis.
The temperature of the air decreases as the altitude increases in the lower atmosphere.
People often use a thermometer to measure temperature and a ruler to measure length.
Animals need food, water, air and shelter to survive in their natural environment.
"""


def tiny_dir(cache_dir: str | os.PathLike, model_cfg: DictConfig) -> Path:
    spec = OmegaConf.to_container(model_cfg.tiny, resolve=True)
    key = hashlib.sha256(json.dumps([FORMAT_VERSION, spec], sort_keys=True).encode()).hexdigest()[:12]
    return Path(cache_dir) / "models" / f"{model_cfg.name}-{key}"


def materialize_tiny(cache_dir: str | os.PathLike, model_cfg: DictConfig) -> Path:
    """Return the tiny model's directory, building it first if it does not exist yet."""
    target = tiny_dir(cache_dir, model_cfg)
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        spec = model_cfg.tiny
        tokenizer = build_tokenizer(int(spec.vocab_size), add_bos=spec.architecture in ("llama", "gemma2"),
                                    add_eos=spec.architecture == "t5")
        tokenizer.save_pretrained(tmp)
        build_model(spec, tokenizer).save_pretrained(tmp, safe_serialization=True)
        try:
            os.rename(tmp, target)  # atomic; fails if another process got there first
        except OSError:
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def build_tokenizer(vocab_size: int, add_bos: bool, add_eos: bool = False):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS.splitlines(), trainer=trainer)
    if add_bos:  # Llama and Gemma tokenizers prepend BOS by default; Qwen2's do not
        bos = tok.token_to_id("<bos>")
        tok.post_processor = processors.TemplateProcessing(
            single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", bos)]
        )
    elif add_eos:  # T5 tokenizers append EOS (</s>) to every encoded text
        eos = tok.token_to_id("<|endoftext|>")
        tok.post_processor = processors.TemplateProcessing(
            single="$A <|endoftext|>", pair="$A <|endoftext|> $B <|endoftext|>", special_tokens=[("<|endoftext|>", eos)]
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<|endoftext|>",
        pad_token="<pad>",
        model_max_length=1_000_000,
    )


def build_model(spec: DictConfig, tokenizer):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    arch = str(spec.architecture)
    if arch == "t5":
        return build_t5(spec, tokenizer)
    kwargs = dict(
        vocab_size=len(tokenizer),
        hidden_size=int(spec.hidden_size),
        intermediate_size=int(spec.intermediate_size),
        num_hidden_layers=int(spec.num_layers),
        num_attention_heads=int(spec.num_heads),
        num_key_value_heads=int(spec.num_kv_heads),
        max_position_embeddings=int(spec.max_position_embeddings),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    if arch == "gemma2":
        kwargs.update(head_dim=int(spec.hidden_size) // int(spec.num_heads), sliding_window=256)
    config = AutoConfig.for_model(arch, **kwargs)
    torch.manual_seed(int(spec.seed))
    return AutoModelForCausalLM.from_config(config)


def build_t5(spec: DictConfig, tokenizer):
    """A FLAN-T5-shaped model (gated-GELU feed-forward: wi_0, wi_1, wo; untied head); PAD is the decoder start."""
    import torch
    from transformers import AutoModelForSeq2SeqLM, T5Config

    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=int(spec.hidden_size),
        d_kv=int(spec.hidden_size) // int(spec.num_heads),
        d_ff=int(spec.intermediate_size),
        num_layers=int(spec.num_layers),
        num_decoder_layers=int(spec.num_layers),
        num_heads=int(spec.num_heads),
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(int(spec.seed))
    model = AutoModelForSeq2SeqLM.from_config(config)
    with torch.no_grad():  # T5 initialises an untied head with std 1: logits far larger than a trained model's
        model.lm_head.weight.normal_(0.0, float(spec.lm_head_std))
    return model
