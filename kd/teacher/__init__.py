"""kd.teacher: the teacher model at inference time.

Owns teacher precision (bf16, NF4, FP8: precision, nf4, nf4_decode), generation and static decoding (generation,
static_decode) and the on-disk teacher-logit cache (cache).
May import: kd.core, kd.data, torchao; never kd.losses, kd.train, kd.ops, kd.testing.
"""
