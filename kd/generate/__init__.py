"""Offline generation: the teacher answering prompts (decoding engine, read-once NF4 product)."""
