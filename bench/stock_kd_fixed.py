"""torchtune 0.6.1's ``knowledge_distillation_single_device``, a copy with one line changed: its CPU bug fixed.

Stock's ``save_checkpoint`` (run at every epoch end) builds

    state_dict = {k: v.cpu() for k, v in self._model.state_dict().items()}

and then ``get_merged_lora_ckpt`` merges ``(alpha / r) B A`` into those tensors *in place*. On CUDA ``.cpu()`` copies,
so nothing happens to the model. On CPU ``.cpu()`` returns the very tensor, so the merge writes into the live model's
frozen base weights: from epoch 2 on the model trains on base + delta (+ 2 delta after epoch 2 ...), and the adapter
it saves no longer describes the model it trained (issue 32). This copy changes only that line to

    state_dict = {k: v.detach().clone().cpu() for k, v in self._model.state_dict().items()}

(``FIXED_LINE``): the merge then works on a copy, as it does on GPU. Everything else is the installed file's text,
read from the installed ``recipes`` package (or ``KD_STOCK_RECIPES_DIR``, as bench/stock_kd_nf4.py) and executed as
a module; the replacement must match exactly once or this script refuses to run.

Run: ``tune run bench/stock_kd_fixed.py --config <stock yaml>`` (bench/quality.py writes the yaml).
"""

import importlib.util
import os
import sys
import types

BUGGY_LINE = "state_dict = {k: v.cpu() for k, v in self._model.state_dict().items()}"
FIXED_LINE = "state_dict = {k: v.detach().clone().cpu() for k, v in self._model.state_dict().items()}"


def stock_path() -> str:
    spec = importlib.util.find_spec("torchtune")
    d = os.environ.get("KD_STOCK_RECIPES_DIR") or os.path.join(os.path.dirname(spec.origin), "..", "recipes")
    return os.path.join(d, "knowledge_distillation_single_device.py")


def fixed_source(src: str) -> str:
    """Stock's source with the one line replaced; refuses a source where it is not found exactly once."""
    n = src.count(BUGGY_LINE)
    if n != 1:
        raise RuntimeError(f"stock recipe: expected the epoch-end line {BUGGY_LINE!r} once, found it {n} times "
                           "(another torchtune version?)")
    return src.replace(BUGGY_LINE, FIXED_LINE)


def load_fixed() -> types.ModuleType:
    path = stock_path()
    with open(path) as f:
        src = fixed_source(f.read())
    mod = types.ModuleType("stock_kd_single_device_fixed")
    mod.__file__ = path
    sys.modules[mod.__name__] = mod
    exec(compile(src, path, "exec"), mod.__dict__)
    return mod


if __name__ == "__main__":
    sys.exit(load_fixed().recipe_main())
