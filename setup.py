from setuptools import find_packages, setup

setup(
    name="offload_bitnet",
    version="0.1.0",
    description="Fine-tune LLaMA-family and BitNet b1.58 models larger than RAM by streaming blocks from SSD",
    packages=find_packages(include=["offload_bitnet", "offload_bitnet.*"]),
    python_requires=">=3.10",
    # torch: install torch==2.13.0 first (the CPU build); an unpinned install pulls a multi-GB CUDA build.
    # matplotlib: loss.png is part of every run's output, so it is installed by default.
    install_requires=["torch", "numpy", "safetensors", "sentencepiece", "psutil", "crc32c", "tokenizers", "jinja2",
                      "gguf", "matplotlib"],
    extras_require={
        "test": ["pytest", "transformers", "accelerate", "peft", "matplotlib", "tiktoken"],
        "plot": [],  # kept so that `pip install -e ".[plot]"` still works; matplotlib is a default requirement
        # The MLX compute backend (offload_bitnet/backends/mlx): Metal on a Mac, the CPU build on Linux.
        "mlx": ["mlx[cpu]; sys_platform == 'linux'", "mlx; sys_platform == 'darwin'"],
    },
    entry_points={"console_scripts": ["offload-bitnet=offload_bitnet.cli:main"]},
)
