"""Correctness of every kd CUDA NF4 kernel choice (kd.teacher.nf4_cuda) against float64, per output row of X.

    python3 bench/nf4_cuda_check.py          # needs CUDA
"""
import sys

import torch
import torch.nn.functional as F
from torchao.dtypes.nf4tensor import to_nf4

from kd.teacher import nf4_cuda as nc
from kd.teacher import nf4_decode as nd

if not torch.cuda.is_available():
    sys.exit("kd: error: bench/nf4_cuda_check.py needs a CUDA device")
why = nc.why_unavailable(torch.device("cuda"))
if why:
    sys.exit(f"kd: error: kd's CUDA NF4 kernels are unavailable here: {why}")
torch.manual_seed(0)
bad = 0
for N, K in ((1024, 8192), (40, 576), (8192, 29568)):
    sb = next(b for b in (256, 128, 64, 40, 32, 8) if (N * K // 64) % b == 0)
    w4 = to_nf4((torch.randn(N, K, device="cuda") * 0.02).bfloat16(), 64, sb)
    wd = w4.get_original_weight().double()
    s = nd.decode_scalers(w4)
    for cfg in nc.gemv_candidates(N, K, 1):
        Ms = (1, 2, 3, 5, 8) if cfg.kind != "lut16" else (1,)
        for M in Ms:
            x = torch.randn(M, K, device="cuda").bfloat16()
            ref = F.linear(x.double(), wd)
            y = nc.gemv(x, w4, s, cfg).double()
            err = ((y - ref).abs().amax(1) / ref.abs().amax(1)).tolist()
            ok = all(e < 2 ** -7 for e in err)
            bad += not ok
            print(f"{'ok ' if ok else 'BAD'} N={N} K={K} M={M} {cfg}: per-row max rel err {[f'{e:.1e}' for e in err]}")
print("NF4 CUDA CHECK", "PASSED" if not bad else f"FAILED ({bad})")
sys.exit(1 if bad else 0)
