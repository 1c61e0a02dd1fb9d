"""kd.losses: the training objective.

Owns the divergences and the fused chunked KD+CE loss (distillation), the config components that name them
(components) and the output-projection heads that call them per forward (heads).
May import: kd.core, kd.teacher (sparse teacher targets); never kd.train, kd.ops, kd.testing.
"""
