"""kd.data: samples to token ids.

Owns the alpaca KD dataset, chat formatting, packing and the shipped demo set (alpaca, assets/) and the offline
SFT label mixing (offline).
May import: kd.core, torchtune datasets/tokenizers.
"""
