"""Config-field metadata of the settings several stages share, declared once (see :mod:`pudding.cli_config`).

A stage's config uses them as ``quantize: str = field(default="none", metadata=QUANTIZE_FIELD)``; the CLI reads
them from this file's source, so they are literals only. This module imports nothing: configs of torch-free
modules (the bench's parent process) use it too.
"""

# pudding.core.quantize.QUANTIZATIONS's keys (tests/test_cli_config.py checks), spelled out to keep torch out.
QUANTIZE_FIELD = {"help": "int8: int8 weights and per-token int8 activations in the blocks' linear layers, on CPU; "
                          "int8-smooth: the same after SmoothQuant outlier migration (docs/QUANTIZATION.md)",
                  "choices": ("none", "int8", "int8-smooth")}
QUANTIZE_HEAD_FIELD = {"help": "with --quantize: the LM head too (else fp32)"}
QUANTIZE_SKIP_FIELD = {"metavar": "SUFFIXES", "help": "with --quantize: keep the blocks' linear layers whose names "
                                                      "end with these comma-separated suffixes in fp32, e.g. "
                                                      "down_proj (default: none)"}

# The Ray cluster settings of the stages that can spread their work over Ray actors (candidates, label).
RAY_ADDRESS_FIELD = {"help": "Ray cluster to join ('auto', 'ray://head:10001'); default: start a local one"}
RAY_ACTORS_FIELD = {"type": "positive_int", "help": "model replicas (Ray actors)"}
RAY_GPUS_FIELD = {"help": "GPUs each replica asks Ray for"}
