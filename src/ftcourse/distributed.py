"""Beyond one machine: the same TRL SFT run under `accelerate launch`, with DDP or FSDP.

Nothing here is a home-made parallel engine. `launch` writes an accelerate config and starts
`accelerate launch -m ftcourse.distributed train ...`; every process runs `ftcourse.sft.train_sft`, and
transformers' Trainer, through accelerate, does the data sharding, the gradient all-reduce (DDP) or the
parameter sharding (FSDP2, torch's `fully_shard`). On the cpu profile the processes talk over gloo on this
machine. accelerate 1.15 enables FSDP only for GPU-like process groups and runs a multi-process CPU job as
DDP even under an FSDP config; `fsdp_on_cpu` lifts exactly that one check, so the sharding itself is
accelerate's and torch's own code. The same module writes the configs for two linked DGX Sparks and for a
multi-GPU server (`CONFIGS`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ftcourse.atomic import atomic_output

STRATEGIES = ("single", "ddp", "fsdp")
# The LoRA run every strategy trains: same data, same order, same global batch.
RUN_SIZES: dict[str, dict[str, Any]] = {
    "cpu": {"steps": 6, "global_batch": 8, "learning_rate": 2e-3, "lora_rank": 16, "max_length": 256},
    "minimal": {"steps": 2, "global_batch": 4, "learning_rate": 2e-4, "lora_rank": 8, "max_length": 256},
    "spark": {"steps": 100, "global_batch": 16, "learning_rate": 2e-4, "lora_rank": 16, "max_length": 1024},
}

_FSDP = {
    "fsdp_version": 2,
    "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
    "fsdp_transformer_layer_cls_to_wrap": "LlamaDecoderLayer",
    "fsdp_reshard_after_forward": True,
    "fsdp_state_dict_type": "SHARDED_STATE_DICT",
    "fsdp_cpu_ram_efficient_loading": True,
    "fsdp_offload_params": False,
}
_COMMON = {"compute_environment": "LOCAL_MACHINE", "main_training_function": "main", "rdzv_backend": "static"}

# accelerate config files, as `accelerate config` would write them. Keys follow accelerate 1.x.
CONFIGS: dict[str, dict[str, Any]] = {
    # accelerate's own CPU launcher starts several processes only through mpirun; with distributed_type
    # MULTI_GPU it starts them with torchrun, and each process, finding no GPU, joins over gloo.
    "cpu-ddp": {
        **_COMMON,
        "distributed_type": "MULTI_GPU",
        "num_machines": 1,
        "num_processes": 2,
        "machine_rank": 0,
        "main_process_ip": "127.0.0.1",
        "main_process_port": 29511,
        "mixed_precision": "no",
        "use_cpu": False,
    },
    # The same FSDP2 settings on this machine's CPU: two processes over gloo. Every process loads the small
    # model itself (no rank-0 broadcast), so cpu_ram_efficient_loading is off.
    "cpu-fsdp": {
        **_COMMON,
        "distributed_type": "FSDP",
        "num_machines": 1,
        "num_processes": 2,
        "machine_rank": 0,
        "main_process_ip": "127.0.0.1",
        "main_process_port": 29512,
        "mixed_precision": "no",
        "use_cpu": False,
        "fsdp_config": {**_FSDP, "fsdp_cpu_ram_efficient_loading": False},
    },
    # Two DGX Sparks joined by their ConnectX-7 link: one process (one GB10 GPU) per machine. Run the same
    # command on both, with machine_rank 0 on the first and 1 on the second.
    "two-sparks": {
        **_COMMON,
        "distributed_type": "FSDP",
        "num_machines": 2,
        "num_processes": 2,
        "machine_rank": 0,
        "main_process_ip": "192.168.100.10",
        "main_process_port": 29500,
        "mixed_precision": "bf16",
        "use_cpu": False,
        "same_network": True,
        "fsdp_config": _FSDP,
    },
    # One server with eight GPUs: FSDP shards parameters, gradients and optimizer states across them.
    "multi-gpu": {
        **_COMMON,
        "distributed_type": "FSDP",
        "num_machines": 1,
        "num_processes": 8,
        "machine_rank": 0,
        "gpu_ids": "all",
        "main_process_port": 29500,
        "mixed_precision": "bf16",
        "use_cpu": False,
        "fsdp_config": _FSDP,
    },
    # The same server with plain DDP: every GPU holds the whole model (fine for LoRA on a model that fits).
    "multi-gpu-ddp": {
        **_COMMON,
        "distributed_type": "MULTI_GPU",
        "num_machines": 1,
        "num_processes": 8,
        "machine_rank": 0,
        "gpu_ids": "all",
        "main_process_port": 29500,
        "mixed_precision": "bf16",
        "use_cpu": False,
    },
}


# (device, strategy) -> the config `run` launches with.
LAUNCH_CONFIGS = {
    ("cpu", "ddp"): "cpu-ddp",
    ("cpu", "fsdp"): "cpu-fsdp",
    ("cuda", "ddp"): "multi-gpu-ddp",
    ("cuda", "fsdp"): "multi-gpu",
}


def config_yaml(name: str, **changes: Any) -> str:
    """The accelerate config `name` (see CONFIGS) as YAML text, with `changes` applied at the top level."""
    import yaml

    if name not in CONFIGS:
        raise ValueError(f"config: unknown name {name!r}; choose one of {sorted(CONFIGS)}")
    unknown = set(changes) - set(CONFIGS[name])
    if unknown:
        raise ValueError(f"config {name!r} has no key(s) {sorted(unknown)}; keys: {sorted(CONFIGS[name])}")
    return yaml.safe_dump({**CONFIGS[name], **changes}, sort_keys=False)


def write_config(name: str, path: str | os.PathLike, **changes: Any) -> Path:
    """Write the accelerate config `name` to `path` (atomically); returns the path."""
    text = config_yaml(name, **changes)
    path = Path(path)
    with atomic_output(path) as temporary:
        Path(temporary).write_text(text, encoding="utf-8")
    return path


def launch_command(name: str, config_file: str | os.PathLike, train_args: Sequence[str]) -> list[str]:
    """The `accelerate launch` command line that runs `train_args` under the config `name`."""
    if name not in CONFIGS:
        raise ValueError(f"config: unknown name {name!r}; choose one of {sorted(CONFIGS)}")
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config_file)]
    return [*launcher, "-m", "ftcourse.distributed", "train", *train_args]


def run(
    strategy: str,
    *,
    steps: int | None = None,
    global_batch: int | None = None,
    num_processes: int = 2,
    timeout_s: float = 300,
) -> dict[str, Any]:
    """Train the shared LoRA run with `strategy` ('single', 'ddp' or 'fsdp') in fresh processes.

    Returns rank 0's record: {'strategy', 'world_size', 'per_device_batch', 'losses', 'seconds', ...}.
    'single' is one process with the whole global batch; 'ddp' and 'fsdp' split it over `num_processes`.
    """
    from ftcourse.profiles import active_profile, run_sizes

    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    sizes = run_sizes(RUN_SIZES)
    steps = steps or sizes["steps"]
    global_batch = global_batch or sizes["global_batch"]
    processes = 1 if strategy == "single" else num_processes
    if global_batch % processes:
        raise ValueError(f"global_batch={global_batch} does not split evenly over {processes} processes")
    with tempfile.TemporaryDirectory(prefix="ftcourse-dist-") as scratch:
        result = Path(scratch) / "result.json"
        train_args = ["--steps", str(steps), "--per-device-batch", str(global_batch // processes)]
        train_args += ["--strategy", strategy, "--out", str(result)]
        if strategy == "single":
            command = [sys.executable, "-m", "ftcourse.distributed", "train", *train_args]

        else:
            name = LAUNCH_CONFIGS[(active_profile().device, strategy)]
            config = write_config(name, Path(scratch) / f"{name}.yaml", num_processes=processes)
            command = launch_command(name, config, train_args)
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        done = subprocess.run(
            command, capture_output=True, text=True, env=env, timeout=timeout_s, check=False
        )
        if done.returncode != 0 or not result.is_file():
            raise RuntimeError(
                f"the {strategy} run failed (exit {done.returncode}); last output:\n"
                + done.stderr.strip()[-3000:]
            )
        return json.loads(result.read_text(encoding="utf-8"))


def fsdp_on_cpu() -> None:
    """Let accelerate run FSDP on a multi-process CPU job (gloo), which 1.15 silently turns into DDP.

    `AcceleratorState.__init__` switches to FSDP only when the process group is MULTI_GPU (or another
    accelerator); on CPUs it stays MULTI_CPU and drops the FSDP plugin, so the Trainer would wrap the model
    in DDP. After the original `__init__` has run, this sets the two fields its GPU branch would have set
    (distributed_type FSDP, the plugin, and the plugin's mixed precision). The sharding that follows is
    accelerate's `fsdp2_prepare_model` calling torch's `fully_shard`, whose collectives gloo supports.
    """
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType

    original = AcceleratorState.__init__
    if getattr(original, "_ftcourse_fsdp_on_cpu", False):
        return

    def __init__(self, *args: Any, fsdp_plugin: Any = None, **kwargs: Any) -> None:
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if self.distributed_type != DistributedType.MULTI_CPU:
            return
        if fsdp_plugin is not None:
            if self._mixed_precision != "no":
                fsdp_plugin.set_mixed_precision(self._mixed_precision)
            self.fsdp_plugin = fsdp_plugin
        # Every later `AcceleratorState()` copies PartialState's MULTI_CPU back over the shared state.
        if getattr(self, "fsdp_plugin", None) is not None:
            self.distributed_type = DistributedType.FSDP

    __init__._ftcourse_fsdp_on_cpu = True  # type: ignore[attr-defined]
    AcceleratorState.__init__ = __init__  # type: ignore[method-assign]


def parameter_bytes(model: Any) -> dict[str, int]:
    """Bytes of `model`'s parameters held by this process ('local') and of the whole model ('full').

    A DTensor parameter (FSDP2) holds only its shard (`to_local()`); a plain tensor holds all of itself.
    """
    local = full = 0
    for parameter in model.parameters():
        size = parameter.element_size()
        full += parameter.numel() * size  # a DTensor's numel() is the global (unsharded) size
        shard = parameter.to_local() if hasattr(parameter, "to_local") else parameter
        local += shard.numel() * size
    return {"local": local, "full": full}


def train_process(steps: int, per_device_batch: int, strategy: str, out: str | os.PathLike) -> dict[str, Any]:
    """One process of a run (called by `accelerate launch`); rank 0 writes its record to `out`."""
    import warnings

    import torch
    from accelerate.state import AcceleratorState

    from ftcourse import data, profiles, sft

    profile = profiles.active_profile()
    sizes = profiles.run_sizes(RUN_SIZES, profile)
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    torch.set_num_threads(1)
    if strategy == "fsdp" and profile.device == "cpu":
        fsdp_on_cpu()
    tokenizer = profiles.load_tokenizer()
    # Exactly the examples the run draws (one epoch of the global batch): tokenizing more costs each process.
    dataset = data.load_records("messages", "train", size=steps * per_device_batch * world, profile=profile)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # launcher and FSDP notices go to the log, not the chapter
        run = sft.train_sft(
            profiles.load_base(profile=profile),
            tokenizer,
            dataset,
            peft_config=sft.lora_config(lora_rank=sizes["lora_rank"], lora_alpha=2 * sizes["lora_rank"]),
            learning_rate=sizes["learning_rate"],
            steps=steps,
            batch_size=per_device_batch,
            max_length=sizes["max_length"],
            warmup_steps=0,
            logging_steps=1,
            copy_model=False,
            profile=profile,
            progress=False,
            extra_args={"ddp_backend": "gloo"} if profile.device == "cpu" and world > 1 else None,
        )
    held = parameter_bytes(run.model)
    every_rank = [held["local"]]
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        every_rank = [0] * world
        torch.distributed.all_gather_object(every_rank, held["local"])
    record = {
        "strategy": strategy,
        "world_size": world,
        "per_device_batch": per_device_batch,
        "global_batch": per_device_batch * world,
        "losses": run.losses,
        "grad_norms": [(log["step"], log["grad_norm"]) for log in run.log_history if "grad_norm" in log],
        "seconds": run.seconds,
        "trainable_parameters": run.trainable_parameters,
        # What the engine did to the model: FSDP2 turns parameters into DTensor shards.
        "distributed_type": AcceleratorState().distributed_type.value,  # what accelerate really ran
        "parameter_types": sorted({type(p).__name__ for p in run.model.parameters()}),
        "parameter_bytes_full": held["full"],
        "parameter_bytes_per_rank": every_rank,
    }
    if rank == 0:
        with atomic_output(Path(out)) as temporary:
            Path(temporary).write_text(json.dumps(record), encoding="utf-8")
    return record


def loss_table(records: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Rows (step, one loss per run, largest difference from the first run) for runs logged every step."""
    names = list(records)
    series = {name: dict((int(s), float(v)) for s, v in records[name]["losses"]) for name in names}
    steps = sorted(set.intersection(*(set(s) for s in series.values())))
    rows = []
    for step in steps:
        row: dict[str, Any] = {"step": step, **{name: series[name][step] for name in names}}
        row["max |Δ| vs " + names[0]] = max(abs(series[n][step] - series[names[0]][step]) for n in names[1:])
        rows.append(row)
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m ftcourse.distributed train|config ...`; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m ftcourse.distributed")
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="one process of a run (accelerate launch starts it)")
    train.add_argument("--steps", type=int, required=True)
    train.add_argument("--per-device-batch", type=int, required=True)
    train.add_argument("--strategy", choices=STRATEGIES, default="single")
    train.add_argument("--out", required=True)
    config = commands.add_parser("config", help="write an accelerate config file")
    config.add_argument("name", choices=sorted(CONFIGS))
    config.add_argument("path")
    args = parser.parse_args(argv)
    if args.command == "train":
        train_process(args.steps, args.per_device_batch, args.strategy, args.out)
    else:
        print(write_config(args.name, args.path))
    return 0


if __name__ == "__main__":
    sys.exit(main())
