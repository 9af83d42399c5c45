"""Config-field metadata of the settings several stages share, declared once (see :mod:`pudding.cli_config`).

A stage's config uses them as ``ray_address: str | None = field(default=None, metadata=RAY_ADDRESS_FIELD)``; the
CLI reads them from this file's source, so they are literals only. The quantization settings, which every stage
that runs the model has, are a base class of their own (:class:`QuantizationFields`). This module imports nothing
heavy: configs of torch-free modules (the bench's parent process) use it too.
"""

from __future__ import annotations  # annotations stay text, as pudding.cli_config reads them

from dataclasses import dataclass, field

# pudding.core.quantize.QUANTIZATIONS's keys (tests/test_cli_config.py checks), spelled out to keep torch out.
QUANTIZE_FIELD = {"help": "int8: int8 weights and per-token int8 activations in the blocks' linear layers, on CPU; "
                          "int8-smooth: the same after SmoothQuant outlier migration; int8-mm, int8-mm-smooth: the "
                          "same with symmetric 8-bit activations through torch._int_mm, fast on CPUs with VNNI; "
                          "bf16: bf16 weights and activations with fp32 accumulation, fast on CPUs with AVX-512 BF16 "
                          "or AMX (docs/QUANTIZATION.md)",
                  "choices": ("none", "int8", "int8-smooth", "int8-mm", "int8-mm-smooth", "bf16")}
QUANTIZE_HEAD_FIELD = {"help": "with --quantize: the LM head too (else fp32)"}
QUANTIZE_SKIP_FIELD = {"metavar": "SUFFIXES", "help": "with --quantize: keep the blocks' linear layers whose names "
                                                      "end with these comma-separated suffixes in fp32, e.g. "
                                                      "down_proj (default: none)"}

# The executor and Ray cluster settings of the stages that can spread their scoring over Ray actors (candidates,
# label, reproduce; their base is pudding.pool.executor.ExecutorFields). The choices are
# pudding.pool.executor.EXECUTORS's keys (tests/test_cli_config.py checks).
EXECUTOR_FIELD = {"choices": ("local", "ray"),
                  "help": "ray: spread the scoring (a search step's candidate sets, the label and score shards) over "
                          "Ray actors, one model replica each (identical results; pip install pudding[ray])"}
RAY_ADDRESS_FIELD = {"help": "Ray cluster to join ('auto', 'ray://head:10001'); default: start a local one"}
RAY_ACTORS_FIELD = {"type": "positive_int", "help": "model replicas (Ray actors)"}
RAY_GPUS_FIELD = {"help": "GPUs each replica asks Ray for"}


@dataclass(frozen=True, kw_only=True)
class QuantizationFields:
    """``--quantize``, ``--quantize-head`` and ``--quantize-skip``: the base of every config whose stage runs the
    model, declared and validated here once. Keyword-only, so a subclass's own fields keep their order and may
    lack defaults; :func:`pudding.cli_config.config_fields` reads them from this source like any other field."""

    quantize: str = field(default="none", metadata=QUANTIZE_FIELD)
    quantize_head: bool = field(default=False, metadata=QUANTIZE_HEAD_FIELD)
    quantize_skip: tuple[str, ...] = field(default=(), metadata=QUANTIZE_SKIP_FIELD)

    def __post_init__(self):
        from pudding.core.quantize import check_quantization, skip_names  # torch: only when a config is built

        check_quantization(self.quantize, self.quantize_head, skip=self.quantize_skip)
        object.__setattr__(self, "quantize_skip", skip_names(self.quantize_skip))

    @property
    def quantization(self) -> dict:
        """The settings as the keyword arguments of ``load_model`` and ``PuddingModel.from_pretrained``."""
        return {"quantize": self.quantize, "quantize_head": self.quantize_head, "quantize_skip": self.quantize_skip}


# The help of every --model that takes a PuDDing artifact (pudding.pool.artifact.SHIPPED_ARTIFACTS names them)
SHIPPED_HELP = ("PuDDing artifact folder, or a shipped one: 'default' (SmolLM2, k=6), 'default-k3', or "
                "'default-adaptive' (a depth ladder, for --tolerance)")
