"""Pretrain the embedded model from scratch: corpus -> tokenizer -> small Llama -> safetensors.

Run `python -m ftcourse.toy.pretrain --out DIR` to rebuild the shipped weights (about 20 minutes on
two CPU cores); the defaults are the recipe of the committed model. Tests run it at a reduced size.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from ftcourse.toy.corpus import pretraining_documents
from ftcourse.toy.tokenizer import END_OF_TEXT, IM_END, train_tokenizer


@dataclass(frozen=True)
class PretrainRecipe:
    """Everything that decides the embedded model; saved next to the weights as recipe.json."""

    seed: int = 0
    n_docs: int = 60_000
    vocab_size: int = 4096
    hidden_size: int = 256  # a multiple of 256 so that GGUF K-quants apply without fallback
    intermediate_size: int = 768  # likewise
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2  # grouped-query attention, as in Llama 3
    seq_len: int = 256
    batch_size: int = 32
    steps: int = 1500
    learning_rate: float = 3e-3
    warmup_steps: int = 100
    weight_decay: float = 0.1
    bf16_autocast: bool = True


def toy_config(recipe: PretrainRecipe, tokenizer: PreTrainedTokenizerFast) -> LlamaConfig:
    """A Llama configuration of the recipe's shape; no BOS token anywhere, eos is <|im_end|>."""
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=recipe.hidden_size,
        intermediate_size=recipe.intermediate_size,
        num_hidden_layers=recipe.num_layers,
        num_attention_heads=recipe.num_heads,
        num_key_value_heads=recipe.num_kv_heads,
        head_dim=recipe.hidden_size // recipe.num_heads,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=tokenizer.convert_tokens_to_ids(IM_END),
        pad_token_id=tokenizer.convert_tokens_to_ids(END_OF_TEXT),
    )


def pack_documents(docs: list[str], tokenizer: PreTrainedTokenizerFast, seq_len: int) -> torch.Tensor:
    """Concatenate documents separated by <|endoftext|> and cut into rows of `seq_len` tokens."""
    separator = tokenizer.convert_tokens_to_ids(END_OF_TEXT)
    ids: list[int] = []
    for encoded in tokenizer(docs, add_special_tokens=False)["input_ids"]:
        ids.extend(encoded)
        ids.append(separator)
    n_rows = len(ids) // seq_len
    return torch.tensor(ids[: n_rows * seq_len]).view(n_rows, seq_len)


def learning_rate_at(step: int, recipe: PretrainRecipe) -> float:
    """Linear warmup, then cosine decay to a tenth of the peak."""
    if step < recipe.warmup_steps:
        return recipe.learning_rate * (step + 1) / recipe.warmup_steps
    progress = (step - recipe.warmup_steps) / max(1, recipe.steps - recipe.warmup_steps)
    return recipe.learning_rate * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


def pretrain(out_dir: Path, recipe: PretrainRecipe, progress: bool = True) -> dict[str, float]:
    """Build the corpus and tokenizer, train the model, and save everything a loader needs to `out_dir`."""
    torch.manual_seed(recipe.seed)
    random.seed(recipe.seed)
    docs = list(pretraining_documents(recipe.n_docs, seed=recipe.seed))
    tokenizer = train_tokenizer(docs, recipe.vocab_size)
    rows = pack_documents(docs, tokenizer, recipe.seq_len)
    model = LlamaForCausalLM(toy_config(recipe, tokenizer))
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": recipe.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=recipe.learning_rate,
        betas=(0.9, 0.95),
    )
    generator = torch.Generator().manual_seed(recipe.seed)
    started = time.perf_counter()
    losses: list[float] = []
    bar = tqdm(range(recipe.steps), desc="pretraining", disable=not progress)
    model.train()
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = learning_rate_at(step, recipe)
        batch = rows[torch.randint(len(rows), (recipe.batch_size,), generator=generator)]
        # bf16 autocast: the weights stay fp32, the matrix products run in bf16 (AMX/AVX-512 on x86).
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=recipe.bf16_autocast):
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}")
    window = max(1, min(50, len(losses) // 5))  # average a few steps: single-batch losses are noisy
    stats = {
        "initial_loss": sum(losses[:window]) / window,
        "final_loss": sum(losses[-window:]) / window,
        "seconds": time.perf_counter() - started,
        "tokens_seen": recipe.steps * recipe.batch_size * recipe.seq_len,
        "corpus_tokens": rows.numel(),
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    save_model(model, tokenizer, out_dir, {"recipe": asdict(recipe), "stats": stats})
    return stats


def save_model(
    model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, out_dir: Path, info: dict
) -> None:
    """Write safetensors weights, tokenizer, generation settings and the recipe into `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model.generation_config = GenerationConfig(
        eos_token_id=model.config.eos_token_id, pad_token_id=model.config.pad_token_id, do_sample=False
    )
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    (out_dir / "recipe.json").write_text(json.dumps(info, indent=2) + "\n")


def main(argv: list[str] | None = None) -> None:
    """Command line: python -m ftcourse.toy.pretrain --out DIR [--steps N] [--docs N]."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True, help="folder to write the model into")
    defaults = PretrainRecipe()
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--docs", type=int, default=defaults.n_docs)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    args = parser.parse_args(argv)
    recipe = PretrainRecipe(steps=args.steps, n_docs=args.docs, seed=args.seed)
    stats = pretrain(args.out, recipe)
    print(json.dumps(stats, indent=2))


if __name__ == "__main__":
    main()
