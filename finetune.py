#!/usr/bin/env python3
"""Fine-tune a BitNet or LLaMA-family model larger than memory by streaming its blocks from disk.

    python finetune.py                              # demo: a small BitNet model learns test_data/demo.txt
    python finetune.py MODEL_OR_STORE --data FILE   # fine-tune a store, HF/Meta folder or .gguf file
    python finetune.py --help                       # every option; --config run.toml reads them from a file
"""
import sys

from offload_bitnet.train.trainer import main

if __name__ == "__main__":
    sys.exit(main())
