"""kd.core: the foundation every other package stands on.

Owns the config helpers and user-error types (config, errors), durable file writes (atomic), progress bars and
logging (progress), state-dict plumbing (state_dict, statecodec) and the custom-kernel switch (kernels).
May import: the standard library, torch, omegaconf, tqdm; nothing else from kd.
"""
