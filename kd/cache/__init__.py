"""kd.cache: the teacher-logit cache (Random-Sampling KD targets written once, read by later epochs).

Owns the on-disk store, its key and fingerprints, the build/write/read passes (store) and the run-time session the
recipe drives at fixed points (session).
May import: kd.core, kd.data, kd.teacher, kd.losses (the sparse-target types), kd.train (checkpoints, distributed
set-up); never kd.generate, kd.ops, kd.testing.
"""
