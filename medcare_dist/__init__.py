"""medcare_dist: two-stage MedCare fine-tuning of Qwen chat models on DeepSpeed ZeRO-3."""

__version__ = "0.1.0"
