"""Peak GPU memory of real training steps: reproduce and extend the shared H100 table.

The `h100` grid is the calibration set (fit_check was fitted to its 13 rows); the `extended` grid, DoRA
included, is held out: settings the estimator has never been compared with. Preference, reward and GRPO
steps are not here yet: they need TRL's trainers, whose fused LM head and reference passes a raw loop
would not reproduce.

Each case runs in a fresh process (a CUDA process keeps what its caching allocator reserved), builds a
`LlamaForCausalLM` from the published shapes in `ftcourse.memory.ARCHITECTURES` with random weights (memory
does not depend on their values, and no checkpoint download is needed), and runs three optimizer steps on
one batch of random token ids with labels = inputs. QLoRA models are built layer by layer on the meta device
and quantized one linear at a time, so a 70B model never exists in bf16 on the GPU.

    python benchmarks/gpu_memory.py --grid h100 --out benchmarks/results/gpu-memory-$(hostname).jsonl
    python benchmarks/gpu_memory.py --grid extended --out ...     # ranks, batch sizes, lengths, optimizers
    python benchmarks/gpu_memory.py --dry-run                     # list the cases with fit_check estimates
    python benchmarks/gpu_memory.py --cpu-smoke                   # one tiny case of each method on the CPU

Every result row carries the estimator's prediction beside the measurement, and the provenance
(device, torch/transformers/peft/bitsandbytes versions, date).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from ftcourse.atomic import atomic_output
from ftcourse.memory import ARCHITECTURES, GIB, LINEARS, Architecture, fit_check

H100_GRID = [
    {"model": m, "method": k, "seq": 512}
    for m, methods in {
        "llama-3.2-1b": ("full", "lora", "qlora"),
        "llama-3.2-3b": ("full", "lora", "qlora"),
        "llama-3.1-8b": ("full", "lora", "qlora"),
    }.items()
    for k in methods
] + [
    {"model": "llama-3.1-8b", "method": "lora", "seq": 2048},
    {"model": "llama-3.1-8b", "method": "qlora", "seq": 2048},
    {"model": "llama-3.1-70b", "method": "qlora", "seq": 512},
    {"model": "llama-3.1-70b", "method": "qlora", "seq": 2048},
]
# Settings the H100 table does not have: the estimator has never seen these.
EXTENDED_GRID = (
    [{"model": "llama-3.1-8b", "method": "lora", "seq": 1024, "rank": r} for r in (8, 64, 256)]
    + [{"model": "llama-3.1-8b", "method": "qlora", "seq": 1024, "batch": b} for b in (2, 4)]
    + [{"model": "llama-3.1-8b", "method": "qlora", "seq": s} for s in (4096, 8192)]
    + [{"model": "llama-3.1-8b", "method": "lora", "seq": 1024, "checkpointing": False}]
    + [{"model": "llama-3.1-8b", "method": "lora", "seq": 1024, "targets": "q_proj,k_proj,v_proj,o_proj"}]
    + [
        {"model": "llama-3.2-3b", "method": "full", "seq": 512, "optimizer": o}
        for o in ("adamw-8bit", "paged-adamw")
    ]
    + [{"model": "llama-3.1-8b", "method": "qlora", "seq": 1024, "double_quant": False}]
    + [
        {"model": "qwen2.5-7b", "method": "qlora", "seq": 1024},
        {"model": "mistral-7b-v0.3", "method": "lora", "seq": 1024},
    ]
    # DoRA: held out from the fit (its magnitude vectors, saved outputs and fp32 weight-norm scratch).
    + [{"model": "llama-3.1-8b", "method": "dora", "seq": s} for s in (512, 2048)]
    + [{"model": "llama-3.2-1b", "method": "dora", "seq": 512, "checkpointing": False}]
)
TINY = Architecture("tiny-cpu", 128, 256, 2, 4, 2, 1024, False)


def case_defaults(case: dict[str, Any]) -> dict[str, Any]:
    """A case with every setting spelled out."""
    return {
        "rank": 16,
        "batch": 1,
        "checkpointing": True,
        "optimizer": "adamw",
        "targets": "all-linear",
        "double_quant": True,
        **case,
    }


def estimate(case: dict[str, Any], arch: Architecture | None = None) -> Any:
    """fit_check for a case."""
    targets = case["targets"] if case["targets"] == "all-linear" else case["targets"].split(",")
    return fit_check(
        arch or case["model"],
        case["method"],
        seq_len=case["seq"],
        batch_size=case["batch"],
        lora_rank=case["rank"],
        targets=targets,
        gradient_checkpointing=case["checkpointing"],
        optimizer=case["optimizer"],
        double_quant=case["double_quant"],
    )


def llama_config(arch: Architecture) -> Any:
    """A LlamaConfig with the architecture's shapes (bias on q/k/v for Qwen2-style models)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=arch.hidden_size,
        intermediate_size=arch.intermediate_size,
        num_hidden_layers=arch.num_layers,
        num_attention_heads=arch.num_heads,
        num_key_value_heads=arch.num_kv_heads,
        head_dim=arch.head_width,
        vocab_size=arch.vocab_size,
        tie_word_embeddings=arch.tie_embeddings,
        attention_bias=arch.qkv_bias,
        use_cache=False,
        attn_implementation="sdpa",
    )


def build_model(arch: Architecture, method: str, device: str, double_quant: bool) -> Any:
    """A random-init bf16 Llama on `device`; for qlora every decoder linear becomes an NF4 Linear4bit."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    config = llama_config(arch)
    if method != "qlora":
        with torch.device(device):
            return LlamaForCausalLM(config).to(torch.bfloat16)
    import bitsandbytes as bnb

    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name in LINEARS:
                old = getattr(parent, name, None)
                if old is None:
                    continue
                new = bnb.nn.Linear4bit(
                    old.in_features,
                    old.out_features,
                    bias=old.bias is not None,
                    compute_dtype=torch.bfloat16,
                    compress_statistics=double_quant,
                    quant_type="nf4",
                    device="meta",
                )
                weight = (
                    torch.randn(old.out_features, old.in_features, dtype=torch.bfloat16, device=device) * 0.02
                )
                new.weight = bnb.nn.Params4bit(
                    weight, requires_grad=False, quant_type="nf4", compress_statistics=double_quant
                ).to(device)
                if old.bias is not None:
                    new.bias = torch.nn.Parameter(
                        torch.zeros(old.out_features, dtype=torch.bfloat16, device=device)
                    )
                if device == "cpu":
                    new.support_avx512bf16_for_cpu = (
                        False  # bitsandbytes 0.50 CPU repack bug, see ftcourse.quant
                    )
                setattr(parent, name, new)
                del weight
    for module in model.modules():  # embeddings, norms, lm_head: still on meta
        for name, param in list(module.named_parameters(recurse=False)):
            if param.is_meta:
                value = torch.empty(param.shape, dtype=torch.bfloat16, device=device)
                torch.nn.init.normal_(value, std=0.02) if value.dim() > 1 else torch.nn.init.ones_(value)
                setattr(module, name, torch.nn.Parameter(value, requires_grad=param.requires_grad))
    if arch.tie_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    with torch.device(device):
        model.model.rotary_emb = LlamaRotaryEmbedding(config)
    return model


def make_optimizer(name: str, params: list[Any]) -> Any:
    """The optimizer named in fit_check's terms."""
    import torch

    if name == "adamw":
        return torch.optim.AdamW(params, lr=1e-5)
    import bitsandbytes as bnb

    return {
        "adamw-8bit": bnb.optim.AdamW8bit,
        "paged-adamw": bnb.optim.PagedAdamW32bit,
        "paged-adamw-8bit": bnb.optim.PagedAdamW8bit,
    }[name](params, lr=1e-5)


def run_case(case: dict[str, Any], device: str, arch: Architecture | None = None) -> dict[str, Any]:
    """Build, prepare and train one case for three steps in this process; the measured row."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    case = case_defaults(case)
    arch = arch or ARCHITECTURES[case["model"]]
    cuda = device == "cuda"
    gib = (lambda: round(torch.cuda.memory_allocated() / GIB, 2)) if cuda else (lambda: None)
    start = time.perf_counter()
    model = build_model(arch, case["method"], device, case["double_quant"])
    loaded, build_s = gib(), time.perf_counter() - start
    params = sum(p.numel() for p in model.parameters())
    if case["method"] == "qlora":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=case["checkpointing"])
    if case["method"] != "full":
        targets = LINEARS if case["targets"] == "all-linear" else case["targets"].split(",")
        lora = LoraConfig(
            r=case["rank"],
            lora_alpha=2 * case["rank"],
            lora_dropout=0.0,
            target_modules=list(targets),
            use_dora=case["method"] == "dora",
        )
        model = get_peft_model(model, lora)
    if case["checkpointing"]:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if case["method"] != "full":
            model.enable_input_require_grads()
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(case["optimizer"], trainable)
    prepared = gib()
    ids = torch.randint(0, arch.vocab_size, (case["batch"], case["seq"]), device=device)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(3):
        begin = time.perf_counter()
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - begin)
    predicted = estimate(case, arch)
    return {
        **case,
        "params": params,
        "trainable": sum(p.numel() for p in trainable),
        "build_s": round(build_s, 1),
        "step_s": round(min(times), 3),
        "loss": round(float(out.loss.detach()), 3),
        "loaded_gib": loaded,
        "prepared_gib": prepared,
        "peak_alloc_gib": round(torch.cuda.max_memory_allocated() / GIB, 2) if cuda else None,
        "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / GIB, 2) if cuda else None,
        "estimate_gib": round(predicted.peak_gib, 2),
        "estimate_phase": predicted.peak_phase,
        **provenance(device),
    }


def provenance(device: str) -> dict[str, Any]:
    """Device name, library versions and the date, for the row."""
    import bitsandbytes
    import peft
    import torch
    import transformers

    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    return {
        "device": name,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "bitsandbytes": bitsandbytes.__version__,
        "date": dt.date.today().isoformat(),
    }


def run_in_fresh_process(case: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    """run_case in a child process; a failure (out of memory included) comes back as an `error` field."""
    command = [sys.executable, __file__, "--one", json.dumps(case)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        return {**case_defaults(case), "error": f"timed out after {timeout_s:.0f} s"}
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines()
        return {**case_defaults(case), "error": lines[-1] if lines else f"exit {done.returncode}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    """Run a grid (or one case, a dry run, or the CPU smoke test); write the rows as JSON lines."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--grid", choices=("h100", "extended", "all"), default="h100")
    parser.add_argument("--out", type=Path, help="JSON-lines file for the results (written atomically)")
    parser.add_argument("--dry-run", action="store_true", help="list the cases and their estimates; no torch")
    parser.add_argument("--cpu-smoke", action="store_true", help="one tiny case per method on the CPU")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: one case in this process, JSON
    parser.add_argument("--timeout-s", type=float, default=900)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(run_case(json.loads(args.one), "cuda")))
        return 0
    grid = {"h100": H100_GRID, "extended": EXTENDED_GRID, "all": H100_GRID + EXTENDED_GRID}[args.grid]
    if args.dry_run:
        for case in map(case_defaults, grid):
            e = estimate(case)
            print(f"{json.dumps(case)}  -> estimate {e.peak_gib:6.2f} GiB at {e.peak_phase}")
        return 0
    if args.cpu_smoke:
        rows = [
            run_case({"model": TINY.name, "method": m, "seq": 64}, "cpu", TINY)
            for m in ("full", "lora", "dora", "qlora")
        ]
    else:
        import torch

        if not torch.cuda.is_available():
            parser.error("no CUDA device: use --dry-run or --cpu-smoke on a machine without a GPU")
        rows = []
        for case in grid:
            rows.append(run_in_fresh_process(case, args.timeout_s))
            print(json.dumps(rows[-1]), flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with atomic_output(args.out) as tmp:
            tmp.write_text("".join(json.dumps(row) + "\n" for row in rows))
    else:
        for row in rows:
            print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
