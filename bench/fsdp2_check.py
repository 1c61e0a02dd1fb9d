"""FSDP2 check for kd.teacher.nf4: torchrun --nproc_per_node N bench/fsdp2_check.py  (N >= 2; NCCL on GPUs, gloo on CPU)

NOTE: world_size 1 fails for ANY NF4Tensor parameter (stock torchtune FrozenNF4Linear too): torch's FSDP2
world_size==1 shortcut (_fsdp_param_group.py) copies only all_gather_inputs[0] while NF4Tensor's
fsdp_post_all_gather expects its 3 inputs -> "ValueError: not enough values to unpack (expected 3, got 1)"
(seen on torch 2.11 / H200 and torch 2.13 / CPU with torchao 0.15). On one GPU, don't fully_shard the NF4 teacher.

Builds the same small Qwen2 teacher on every rank, quantises it with kd.train.models.nf4_linears_, takes the unsharded
output as reference, then fully_shard()s every layer + the root and checks the sharded forward (fast and stock NF4
paths) against it, and that the weights are DTensors wrapping NF4Tensor shards.
"""

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torchao.dtypes.nf4tensor import NF4Tensor

from kd.teacher import nf4 as knf4
from kd.train.models import nf4_linears_


def main():
    cuda = torch.cuda.is_available()
    dev = "cuda" if cuda else "cpu"
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if cuda:
        torch.cuda.set_device(rank)
    from torchtune.models.qwen2._component_builders import qwen2
    torch.manual_seed(0)
    dims = (dict(vocab_size=4096, num_layers=4, num_heads=16, num_kv_heads=4, embed_dim=2048,
                 intermediate_dim=5632) if cuda else
            dict(vocab_size=256, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=256, intermediate_dim=512))
    with torch.device(dev):
        m = qwen2(max_seq_len=2048, rope_base=1e6, **dims)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.02)
            elif n.endswith("bias"):
                p.normal_(0, 0.02)
    m = m.to(torch.bfloat16).eval()
    nf4_linears_(m.layers, fast=True)  # the teacher path: decoder linears only
    m.requires_grad_(False)
    V = dims["vocab_size"]
    tok = torch.randint(0, V, (2, 64), generator=torch.Generator().manual_seed(1)).to(dev)
    with torch.no_grad():
        ref = m(tok)
    mesh = init_device_mesh(dev, (world,))
    for layer in m.layers:
        fully_shard(layer, mesh=mesh, reshard_after_forward=True)
    fully_shard(m, mesh=mesh)
    w = m.layers[0].attn.q_proj.weight
    local = getattr(w, "_local_tensor", None)
    ok_types = type(w).__name__ == "DTensor" and isinstance(local, NF4Tensor)
    with torch.no_grad():
        out_fast = m(tok)
        knf4.set_fast_(m, False)
        out_stock = m(tok)
    res = dict(rank=rank, world=world, weight=type(w).__name__, local=type(local).__name__,
               local_shape=tuple(local.shape) if local is not None else None,
               fast_equal_unsharded=bool(torch.equal(out_fast, ref)),
               stock_equal_unsharded=bool(torch.equal(out_stock, ref)),
               max_abs_diff=(out_fast.float() - ref.float()).abs().max().item())
    print(res, flush=True)
    if rank == 0:
        print("FSDP2 CHECK", "PASS" if ok_types and res["fast_equal_unsharded"] else "FAIL", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
