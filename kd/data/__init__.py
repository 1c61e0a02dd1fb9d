"""kd.data: samples to token ids.

Owns the alpaca KD dataset, chat formatting, packing and the shipped demo set (alpaca, assets/) and the offline
SFT label mixing (offline); data text that cannot forge chat turns (special_text); the real Qwen2.5 tokenizer
derived offline from dashscope's qwen.tiktoken (qwen_tokenizer).
May import: kd.core, torchtune datasets/tokenizers.
"""
