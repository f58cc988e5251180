"""vllm-specextend: SpecExtend (arXiv 2505.20776) speculative decoding for
long inputs, as a vLLM plugin."""

from vllm_specextend.config import SpecExtendConfig, SpecExtendConfigError

__all__ = ["SpecExtendConfig", "SpecExtendConfigError"]
__version__ = "0.1.0"
