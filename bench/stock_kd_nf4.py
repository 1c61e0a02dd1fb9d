"""Stock torchtune ``knowledge_distillation_single_device`` with an NF4 teacher, timed per step.

The recipe class is torchtune 0.6.1's own, loaded from the installed ``recipes`` package file; nothing in its
training loop is changed. Two additions, both outside the loop:

- ``nf4_teacher: True``: after stock loads the teacher (bf16, its own code), every decoder-layer linear weight is
  converted to a torchao ``NF4Tensor`` and run through ``linear_nf4``: the storage and kernel stock torchtune's
  QLoRA uses for its frozen base weights. Stock has no quantized-teacher option (its loader is strict and its
  QLoRA builders add adapters), so this is the closest stock path to the recipe's NF4 teacher.
- ``timing_file: PATH``: one JSON line per logged step: wall seconds since the previous step (the stock loop
  calls ``.item()`` when it logs, so the step is complete), non-pad and answer tokens of the step (counted on the
  device, read at the log), and the peak allocated GPU memory of the step.

Run: ``tune run bench/stock_kd_nf4.py --config <stock yaml> nf4_teacher=True timing_file=/path/timing.jsonl``
(``bench/recipe_bench.py`` writes the config for the same job as the recipe runs).
"""

import importlib.util
import json
import os
import sys
import time

import torch
from torch import nn
from torchtune import config

# torchtune's wheel installs its recipes as a top-level `recipes` package beside `torchtune`; a machine that moved
# it out of the way (so ./recipes wins the import) names the folder in KD_STOCK_RECIPES_DIR.
_spec = importlib.util.find_spec("torchtune")
_DIR = os.environ.get("KD_STOCK_RECIPES_DIR") or os.path.join(os.path.dirname(_spec.origin), "..", "recipes")
_STOCK = os.path.join(_DIR, "knowledge_distillation_single_device.py")
_mod_spec = importlib.util.spec_from_file_location("stock_kd_single_device", _STOCK)
stock = importlib.util.module_from_spec(_mod_spec)
_mod_spec.loader.exec_module(stock)


class NF4Linear(nn.Module):
    """A frozen linear whose weight is a torchao NF4Tensor (as torchtune's FrozenNF4Linear stores it)."""

    def __init__(self, lin: nn.Linear):
        from torchao.dtypes.nf4tensor import to_nf4

        super().__init__()
        self.weight = nn.Parameter(to_nf4(lin.weight.data), requires_grad=False)
        self.bias = lin.bias

    def forward(self, x):
        from torchao.dtypes.nf4tensor import linear_nf4

        y = linear_nf4(x, self.weight)
        return y if self.bias is None else y + self.bias


def _to_nf4(module: nn.Module) -> int:
    n = 0
    for name, child in module.named_children():
        if isinstance(child, nn.Linear):
            setattr(module, name, NF4Linear(child))
            n += 1
        else:
            n += _to_nf4(child)
    return n


class TimedStockKD(stock.KDRecipeSingleDevice):
    def __init__(self, cfg):
        self._nf4_teacher = bool(cfg.get("nf4_teacher", False))
        self._timing_path = cfg.get("timing_file", None)
        super().__init__(cfg)

    def _setup_teacher_model(self, model_cfg, model_state_dict):
        model = super()._setup_teacher_model(model_cfg, model_state_dict)
        if self._nf4_teacher:
            n = sum(_to_nf4(layer) for layer in model.layers)
            torch.cuda.empty_cache()
            print(f"[stock_kd_nf4] teacher: {n} decoder linears -> torchao NF4", flush=True)
        return model

    def _loss_step(self, batch):
        # counted on the device; read when the step is logged (stock syncs there anyway)
        self._tok_count += (batch["tokens"] != self._tokenizer.pad_id).sum()
        self._ans_count += (batch["labels"][..., 1:] != self._loss_fn.ignore_index).sum()
        return super()._loss_step(batch)

    def setup(self, cfg):
        super().setup(cfg)
        dev = self._device
        self._tok_count = torch.zeros((), dtype=torch.long, device=dev)
        self._ans_count = torch.zeros((), dtype=torch.long, device=dev)
        inner = self._metric_logger.log_dict
        fh = open(self._timing_path, "a") if self._timing_path else None

        def log_dict(payload, step):
            now = time.perf_counter()
            row = {"step": step, "step_s": now - self._t_last, "tokens": int(self._tok_count),
                   "answer_tokens": int(self._ans_count)}
            if dev.type == "cuda":
                row["peak_alloc_gib"] = torch.cuda.max_memory_allocated(dev) / 2**30
                torch.cuda.reset_peak_memory_stats(dev)
            self._tok_count.zero_()
            self._ans_count.zero_()
            if fh:
                fh.write(json.dumps(row) + "\n")
                fh.flush()
            inner(payload, step=step)
            self._t_last = time.perf_counter()  # logging itself is not part of the next step

        self._metric_logger.log_dict = log_dict

    def train(self):
        if self._device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self._device)
        self._t_last = time.perf_counter()
        super().train()


@config.parse
def recipe_main(cfg) -> None:
    config.log_config(recipe_name="TimedStockKD", cfg=cfg)
    recipe = TimedStockKD(cfg=cfg)
    recipe.setup(cfg=cfg)
    recipe.train()
    recipe.cleanup()


if __name__ == "__main__":
    sys.exit(recipe_main())
