"""kd: online knowledge distillation on torchtune (LoRA student vs live NF4/bf16 teacher)."""

__version__ = "0.1.0"
