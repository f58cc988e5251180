"""vllm-specextend: SpecExtend (arXiv 2505.20776) speculative decoding for
long inputs, as a vLLM plugin."""

__all__ = ["SpecExtendConfig", "SpecExtendConfigError"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # Lazy: the kernels (attention/, retrieval/) import with torch and Triton
    # alone, without the settings' pydantic.
    if name in __all__:
        from vllm_specextend import config

        return getattr(config, name)
    raise AttributeError(f"module 'vllm_specextend' has no attribute {name!r}")
