"""kd.ops: operating a run without training it.

Owns the one key table per recipe (schema), the memory/time planner (planner, jobtime), preflight and its kernel
check (preflight, kernel_check), the `kd` command (cli) and `kd summary` (summary).
May import: every kd package except kd.testing; never recipes (the planner reads recipes/kd_lora.py as text).
"""
