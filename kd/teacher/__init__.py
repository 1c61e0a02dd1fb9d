"""kd.teacher: the teacher model at inference time.

Owns what a run loads of the teacher: precision (bf16, NF4, FP8: precision, nf4, nf4_cuda). Offline generation
(decoding the teacher) is kd.generate's, the teacher-logit cache kd.cache's.
May import: kd.core, kd.data, torchao; never kd.losses, kd.train, kd.ops, kd.testing.
"""
