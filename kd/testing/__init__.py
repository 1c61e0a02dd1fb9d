"""kd.testing: fixtures for tests, benchmarks and the demo, built locally (no hub access).

Owns the tiny Qwen2 test bed (testbed: `python -m kd.testing.testbed --out DIR`), the tiny tokenizer builder and
converter (tokenizer) and its assets (assets/tiny_tokenizer).
May import: every kd package; nothing in kd imports kd.testing.
"""
