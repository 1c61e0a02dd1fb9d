"""``kd`` console command.

    kd preflight --config CFG [key=value ...] [--nominal-gbps 24] [--bw-mb N]
        Checks of this node (or, under torchrun, of every node): versions, code/config hashes, checkpoints,
        memory vs the plan, disk, all-reduce bandwidth. Exit 0 = OK, 1 = a check failed, 2 = config error.
    kd plan --config CFG [key=value ...] [--world-size N] [--nproc-per-node M] [--batch-size B]
            [--seq-len S] [--ac-layers K] [--device-memory-gib G | --gb10] [--reserve-gib R] [--sweep]
        Per-device peak-memory estimate of recipes/kd_lora.py for that config (kd.ops.planner).
    kd plan --time --config CFG [key=value ...] [--hardware h200|gb10|PROFILE.yaml] [--world-size N]
            [--data FILE.json | --lengths records=N,prompt=D,answer=D]
        Estimated time of one epoch and of the whole run (a kd_lora config), or of plan A's teacher
        generation (a generate_teacher config), per component, from the config's real token counts (kd.ops.jobtime):
        of its data file, of --data FILE, or drawn from a stated length distribution (--lengths; kd plan --help).
        Without the model files the tokens are counted with kd's offline Qwen2.5 tokenizer (the output says which).
    kd calibrate --config CFG [key=value ...] [--out PROFILE.yaml] [--name NAME] [--overwrite] [--base h200|gb10|YAML]
            [--device cuda|cpu] [--doc-len N] [--reps N] [--disk-mb N] [--allreduce-mb N]
        1-3 minutes on a GPU (seconds for the tiny CPU config): measures this machine at the config's shapes (GEMMs
        in bf16 and FP8, NF4 dequantisation, copy bandwidth, one teacher and one student layer as configured,
        attention at the packed length, the fused loss head, disk; the all-reduce under torchrun) with random
        weights, no model files, and writes a hardware profile for kd plan --time --hardware PROFILE.yaml
        (kd.ops.calibrate). Refuses to replace an existing --out without --overwrite.
    kd summary OUTPUT_DIR [--evaluate-config CFG] [--export-config CFG] [--eval-data JSON]
        Three lines about a finished run: KL before -> after, where the adapter is, the next command.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import List, Optional

from kd.core.config import ConfigError
from kd.ops import jobtime, planner
from kd.ops.preflight import load_config
from kd.train.cli_util import user_error_types


def _plan(argv: List[str]) -> int:
    p = argparse.ArgumentParser(prog="kd plan", description="Estimate peak memory per device for a kd_lora config.")
    p.add_argument("--config", required=True)
    p.add_argument("--world-size", type=int, default=1, help="total processes (nodes x GPUs per node)")
    p.add_argument("--nproc-per-node", type=int, default=None, help="GPUs per node (for fsdp_strategy=hybrid)")
    p.add_argument("--batch-size", type=int, default=None, help="micro-batch per device (default: config)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sample (default: tokenizer.max_seq_len)")
    p.add_argument("--ac-layers", type=int, default=None,
                   help="student layers with activation checkpointing (default: all if enabled, else 0)")
    p.add_argument("--device-memory-gib", type=float, default=None, help="memory of one device in GiB")
    p.add_argument("--gb10", action="store_true", help="device memory = 128 GB unified (DGX Spark / GB10)")
    p.add_argument("--reserve-gib", type=float, default=None,
                   help="kept free for CUDA context, allocator slack and the OS (default 8 on GPU; 12 with --gb10: + the "
                        "page cache of a checkpoint shard)")
    p.add_argument("--sweep", action="store_true", help="also print the peak for batch sizes 1, 2, 4, ...")
    p.add_argument("--time", action="store_true",
                   help="estimate the job's time (one epoch, the whole run; plan A's generation for a generate config)")
    p.add_argument("--sample-records", type=int, default=None,
                   help="with --time: tokenize only this many records and resample them to the data set's size")
    p.add_argument("--hardware", default=None,
                   help="with --time: h200, gb10 or a YAML profile (default: both h200 and gb10)")
    p.add_argument("--data", default=None, metavar="FILE",
                   help="with --time: count the tokens of this alpaca JSON/JSONL file (the recipe reads it as "
                        "dataset.source=FILE, or source=FILE for a generate config)")
    p.add_argument("--lengths", default=None, metavar="SPEC",
                   help="with --time, no data file: draw the records from a stated length distribution, seeded. "
                        + jobtime.LENGTHS_HELP.replace("%", "%%") + ". The chat template and the config's "
                        "system_prompt are added as measured on an empty record, each sample is cut at max_seq_len. "
                        "E.g. records=23683,prompt=19-109,answer=p50:400/p95:1500")
    args, overrides = p.parse_known_args(argv)
    flags = [a for a in overrides if a.startswith("-")]
    if flags:
        raise ConfigError(f"unknown option(s) {' '.join(flags)} (see kd plan --help).")
    cfg = load_config(args.config, overrides)
    if args.time:
        return _plan_time(cfg, args)
    planner.validate_recipe_config(cfg)  # the recipe's own checks: misspelled keys fail here as in tune run
    mem = planner.GB10_MEMORY_GIB if args.gb10 else args.device_memory_gib
    kw = dict(local_world_size=args.nproc_per_node or args.world_size, seq_len=args.seq_len,
              ac_layers=args.ac_layers, device_memory_gib=mem, reserve_gib=args.reserve_gib)
    if (args.gb10 or mem is not None) and args.reserve_gib is None:
        kw["reserve_gib"] = planner.GB10_RESERVE_GIB if args.gb10 else 8.0
    plan = planner.plan_from_config(cfg, args.world_size, batch_size=args.batch_size, **kw)
    print(plan.table())
    cache = planner.cache_summary(cfg, args.world_size, batch_size=args.batch_size, **kw)
    if cache:
        print("\n" + cache)
    if args.sweep:
        print("\nbatch sweep (same settings):")
        b = 1
        while b <= 64:
            pb = planner.plan_from_config(cfg, args.world_size, batch_size=b, **kw)
            fit = "" if pb.fits is None else ("  fits" if pb.fits else "  does not fit")
            print(f"  batch {b:>3} x {pb.inputs.seq_len}: peak {pb.peak_gib:7.2f} GiB{fit}")
            if pb.fits is False:
                break
            b *= 2
    return 0


def _plan_time(cfg, args) -> int:
    from omegaconf import OmegaConf, open_dict

    names = [args.hardware] if args.hardware else ["h200", "gb10"]
    hws = [jobtime.load_hardware(n) for n in names]
    generate = cfg.get("max_new_tokens", None) is not None and cfg.get("teacher_model", None) is None
    if not generate:
        planner.validate_recipe_config(cfg)  # a kd_lora config: the recipe's own checks first
    # where the token counts come from: the config's data file, --data FILE, or --lengths (no file at all)
    key = "source" if generate else "dataset.source"
    if args.data and args.lengths:
        raise ConfigError("kd plan --time: give --data FILE or --lengths SPEC, not both.")
    if args.lengths and args.sample_records:
        raise ConfigError("kd plan --time: --sample-records samples a data file; --lengths draws every record already.")
    lengths = jobtime.parse_lengths(args.lengths) if args.lengths else None
    if args.data:
        if not generate and not str(cfg.dataset.get("_component_", "")).startswith("kd.data."):
            raise ConfigError(f"kd plan --time --data: dataset {cfg.dataset.get('_component_')} is not a kd.data "
                              "dataset; set its own keys instead (dataset.source=..., data_files=...).")
        with open_dict(cfg):
            OmegaConf.update(cfg, key, args.data, force_add=True)
    src = OmegaConf.select(cfg, key, default=None)
    if lengths is None and isinstance(src, str) and not Path(src).is_file():
        raise ConfigError(f"kd plan --time: no data to count tokens from: {'--data' if args.data else key} {src} "
                          "does not exist here; give the data file (--data FILE.json, alpaca JSON/JSONL) or the data's "
                          "stated length distribution (--lengths records=N,prompt=MEAN:STD,answer=MEAN:STD; "
                          "kd plan --help).")
    print(jobtime.resolve_tokenizer(cfg))  # the config's tokenizer files, or kd's offline Qwen2.5 tokenizer
    if generate:
        # a generation config (recipes/generate_teacher.py): plan A's decode time
        expected, source = _expected_answer_lengths(cfg, args.sample_records, lengths)
        print(f"answer lengths: {source}")
        for hw in hws:
            print(jobtime.estimate_generation(cfg, hw, expected_new_tokens=expected).table())
        return 0

    stats = jobtime.data_stats(cfg, sample_records=args.sample_records, lengths=lengths)
    print(f"token counts: {stats.source}")
    for hw in hws:
        print(jobtime.estimate_job(cfg, hw, stats, world_size=args.world_size,
                                   nproc_per_node=args.nproc_per_node or 1).table())
    return 0


def _expected_answer_lengths(cfg, sample_records=None, lengths=None):
    """Generation configs: the teacher's answers are expected as long as the data set's reference answers
    (or as the stated answer lengths); returns (answer lengths, where they come from)."""
    from omegaconf import OmegaConf

    ds = OmegaConf.create({
        "tokenizer": OmegaConf.to_container(cfg.tokenizer, resolve=True),
        "dataset": {"_component_": "kd.data.alpaca.alpaca_kd_dataset", "source": cfg.source,
                    **({"system_prompt": cfg.system_prompt} if cfg.get("system_prompt") else {})},
        "batch_size": 1,
    })
    stats = jobtime.data_stats(ds, sample_records=sample_records, lengths=lengths)
    return stats.answers, stats.source


def main(argv: Optional[List[str]] = None) -> int:
    import logging

    logging.getLogger("torchao").setLevel(logging.ERROR)
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    try:
        if cmd == "plan":
            return _plan(rest)
        if cmd == "calibrate":
            from kd.ops.calibrate import main as calibrate_main

            return calibrate_main(rest)
        if cmd == "summary":
            from kd.ops.summary import main as summary_main

            return summary_main(rest)
        if cmd == "preflight":
            from kd.ops.preflight import main as preflight_main

            return preflight_main(rest)
    except user_error_types() as e:
        if os.environ.get("KD_DEBUG"):
            raise
        from kd.train.cli_util import one_line

        print(f"kd {cmd}: error: {one_line(e)}", file=sys.stderr)
        return 2
    print(f"kd: unknown command {cmd!r}; use 'kd plan', 'kd calibrate', 'kd preflight' or 'kd summary' (kd --help).", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
