"""lorafit: QLoRA fine-tuning of causal language models on one GPU, many GPUs and SLURM clusters.

Data flows one way: recipe -> layout -> data/model -> trainer -> run dir. See README.md.
"""

import logging

__version__ = "0.1.0"

# bitsandbytes warns at import, on CPUs with AVX512-BF16, that it cannot download an optional CPU kernel from the hub
# (it falls back to its own). Set before anything imports bitsandbytes (peft and transformers do).
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
