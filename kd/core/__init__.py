"""kd.core: the foundation every other package stands on.

Owns the config helpers and user-error types (config, errors), durable file writes (atomic), progress bars and
logging (progress), state-dict plumbing (state_dict, statecodec), the custom-kernel switch (kernels) and the
one-live-run-per-output_dir lock (run_lock).
May import: the standard library, torch, omegaconf, tqdm; nothing else from kd.
"""
