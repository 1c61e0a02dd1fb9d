"""kd.train: what the recipes run around the loss step.

Owns model building and loading (models), checkpoints and exports (adapter_io, step_checkpoint, hf_export,
quantize, full), distributed setup (dist), non-finite guard, timing, metric logging, run-time checks (run_checks),
on-policy sampling, the evaluation report and the recipe entry point (cli_util).
May import: kd.core, kd.data, kd.teacher, kd.generate, kd.losses; never kd.cache, kd.ops, kd.testing, recipes.
"""
