"""kd.losses: the training objective.

Owns the divergences and the fused chunked KD+CE loss (distillation), the config components that name them
(components) and the output-projection heads that call them per forward (heads).
May import: kd.core; never kd.teacher, kd.cache, kd.train, kd.ops, kd.testing (the sparse-target types the cache
shares are here, in sparse).
"""
