"""lorafit: QLoRA fine-tuning of causal language models on one GPU, many GPUs and SLURM clusters.

Data flows one way: recipe -> layout -> data/model -> trainer -> run dir. See README.md.
"""

__version__ = "0.1.0"
