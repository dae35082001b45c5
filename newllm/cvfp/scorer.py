"""eval-ppl's `model_kind: cvfp`: a trained CVFP LM read as a recurrent model.

It has no window: each stream (one document after the separator, or all of them back to
back) is read from its first token with every block's context carried, as phase 2 was
trained; the contexts after token t and the embedding of token t predict token t+1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from newllm.core.base import BaseInfo
from newllm.core.errors import NewllmError
from newllm.core.tokens import separator_token_id
from newllm.cvfp.checkpoint import load_lm
from newllm.cvfp.model import CVFPLM
from newllm.cvfp.phase2 import EVAL_BATCH, control_contexts, layer_inputs
from newllm.cvfp.recurrence import stream_contexts

CHUNK_TOKENS = 8192


@dataclass
class CVFPScorer:
    model: CVFPLM
    device: torch.device
    info: BaseInfo
    separator_id: int
    separator_token: str
    max_length: int | None = None
    contexts: str = "cvfp"  # cvfp | zeros | shuffled (within each stream): phase 2's controls

    def _logits(self, ids: torch.Tensor, positions: torch.Tensor,
                contexts: torch.Tensor) -> torch.Tensor:
        return self.model.next_token_logits(layer_inputs(contexts[positions].to(self.device)),
                                            ids[positions].to(self.device)).float()

    def logits(self, input_ids: torch.Tensor, keep: int) -> torch.Tensor:
        rows = []
        for ids in input_ids.cpu():
            contexts = control_contexts(stream_contexts(
                self.model, ids, chunk_tokens=CHUNK_TOKENS, device=self.device), self.contexts)
            rows.append(self._logits(ids, torch.arange(len(ids) - keep, len(ids)), contexts))
        return torch.stack(rows)

    @torch.no_grad()
    def stream_nll(self, ids: torch.Tensor, mask: torch.Tensor) -> float:
        contexts = control_contexts(stream_contexts(self.model, ids, chunk_tokens=CHUNK_TOKENS,
                                                    device=self.device), self.contexts)
        positions = torch.nonzero(mask[1:]).squeeze(1)  # predicting token t+1 from t
        total = 0.0
        for start in range(0, len(positions), EVAL_BATCH):
            batch = positions[start:start + EVAL_BATCH]
            logits = self._logits(ids, batch, contexts)
            total += float(F.cross_entropy(logits, ids[batch + 1].to(self.device),
                                           reduction="sum"))
        return total


def load_cvfp_scorer(base_params: Any, checkpoint: str | None) -> CVFPScorer:
    if checkpoint is None:
        raise NewllmError("eval_ppl.checkpoint is null; model_kind cvfp needs the "
                          "phase2-token artifact (artifacts/cvfp/lm.safetensors).")
    base = base_params.load()
    embeddings = base.model.get_input_embeddings().weight.detach().float().cpu()
    model, _ = load_lm(checkpoint, base.info.as_dict(), embeddings)
    model.to(base.device)
    separator = separator_token_id(base.tokenizer, base_params.separator_token)
    return CVFPScorer(model, base.device, base.info, separator,
                      base.tokenizer.convert_ids_to_tokens(separator))
