"""kd.generate: the teacher answering prompts (offline generation, on-policy sampling, evaluation answers).

Owns the decoding engine: batching and sampling (generation), static-shape CUDA-graph decoding (static_decode), its
attention kernel (decode_attention), grouped projections (linear_groups) and the read-once NF4 product of decode
steps (nf4_matmul).
May import: kd.core, kd.data, kd.teacher; never kd.losses, kd.train, kd.ops, kd.testing.
"""
