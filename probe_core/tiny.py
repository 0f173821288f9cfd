"""A tiny but real checkpoint: HF Llama base + local tokenizer, PEFT LoRA, AdamW state after a
few real steps. Used by `entropy-probe tiny-checkpoint`, the demo, tests and benchmarks."""

from __future__ import annotations

import os
import string
from dataclasses import dataclass

import torch

DEFAULT_ALPHABET = string.ascii_lowercase + string.digits + " +-=?:#"
# every character of the template is in the alphabet, so chat prompts tokenize losslessly
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'][0] }}: {{ m['content'] }} {% endfor %}"
                 "{% if add_generation_prompt %}a:{% endif %}")
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class TinyConfig:
    alphabet: str = DEFAULT_ALPHABET
    vocab_size: int | None = None   # pad the vocabulary with <x_i> tokens up to this size
    pad_equals_eos: bool = False
    hidden_size: int = 32
    layers: int = 2
    heads: int = 4
    lora_rank: int = 4
    lora_targets: tuple[str, ...] = tuple(LORA_TARGETS)
    train_steps: int = 3
    lr: float = 1e-2
    weight_decay: float = 0.01
    seed: int = 0
    init_std: float = 0.02          # larger: a peakier, less uniform random policy


def build_tokenizer(cfg: TinyConfig):
    """Character-level fast tokenizer built locally (nothing downloaded)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<eos>"] if cfg.pad_equals_eos else ["<pad>", "<eos>"]
    tokens = specials + list(dict.fromkeys(cfg.alphabet))
    if cfg.vocab_size is not None:
        tokens += [f"<x{i}>" for i in range(cfg.vocab_size - len(tokens))]
    vocab = {t: i for i, t in enumerate(tokens)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<eos>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("<x[0-9]+>|."), behavior="isolated")
    tk.decoder = decoders.Fuse()
    pad = "<eos>" if cfg.pad_equals_eos else "<pad>"
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>", pad_token=pad,
                                  padding_side="left")
    tok.chat_template = CHAT_TEMPLATE
    return tok


def _toy_batch(tok, alphabet: str, n: int, gen: torch.Generator
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """A copy task over the alphabet ("abc" → "abcabc"), so any alphabet works."""
    chars = list(dict.fromkeys(alphabet))
    texts = []
    for _ in range(n):
        k = int(torch.randint(1, 4, (1,), generator=gen))
        word = "".join(chars[int(i)] for i in torch.randint(0, len(chars), (k,), generator=gen))
        texts.append(word + word)
    enc = [tok.encode(t) + [tok.eos_token_id] for t in texts]
    width = max(len(e) for e in enc)
    ids = torch.full((n, width), tok.pad_token_id)
    mask = torch.zeros((n, width), dtype=torch.long)
    for i, e in enumerate(enc):
        ids[i, :len(e)], mask[i, :len(e)] = torch.tensor(e), 1
    return ids, mask


def write_tiny_base(base_dir: str, cfg: TinyConfig | None = None):
    """Write only the base: a random Llama and its tokenizer, as a HF directory. Returns the
    tokenizer."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = cfg or TinyConfig()
    torch.manual_seed(cfg.seed)
    tok = build_tokenizer(cfg)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=cfg.hidden_size, intermediate_size=2 * cfg.hidden_size,
        num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.heads, max_position_embeddings=512,
        bos_token_id=None, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False, initializer_range=cfg.init_std)
    AutoModelForCausalLM.from_config(config).save_pretrained(base_dir)
    tok.save_pretrained(base_dir)
    return tok


def write_tiny_checkpoint(out_dir: str, cfg: TinyConfig | None = None) -> tuple[str, str]:
    """Write <out_dir>/base and <out_dir>/adapter (with optimizer.pt). Returns both paths."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    cfg = cfg or TinyConfig()
    base_dir, adapter_dir = os.path.join(out_dir, "base"), os.path.join(out_dir, "adapter")
    tok = write_tiny_base(base_dir, cfg)
    base = AutoModelForCausalLM.from_pretrained(os.path.abspath(base_dir))
    model = get_peft_model(base, LoraConfig(r=cfg.lora_rank, lora_alpha=2 * cfg.lora_rank,
                                            target_modules=list(cfg.lora_targets),
                                            lora_dropout=0.0))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)
    model.train()
    for _ in range(cfg.train_steps):
        ids, mask = _toy_batch(tok, cfg.alphabet, 8, gen)
        labels = ids.masked_fill(mask == 0, -100)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(adapter_dir)
    torch.save(opt.state_dict(), os.path.join(adapter_dir, "optimizer.pt"))
    return base_dir, adapter_dir
