"""Infini-attention LMs with compressive memory, and the reversal curse (seeds/004).

The line's models (`create_model`: pythia, infini, multi_memory, hierarchical), their
memory state (get/set, save/load as safetensors), training on segments, the memory probes
(compressions curve, passkey) and eval-reversal's library live here; the stages
(`train-lm`, `eval-reversal`, the eval-ppl kinds) are thin shells in `stages/`.
"""

LM_KINDS = ("pythia", "infini", "multi_memory", "hierarchical")  # create_model's (train_lm.kind)
