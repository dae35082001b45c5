"""CVFP on the real default model's embeddings and tokenizer (SmolLM2-135M), small sizes."""

from __future__ import annotations

import pytest
import torch

from newllm.core.base import load_base
from newllm.core.train import TrainConfig
from newllm.cvfp.model import CVFPLM, CVFPConfig
from newllm.cvfp.phase1 import Phase1Config, train_context_blocks
from newllm.cvfp.phase2 import evaluate, train_token_block
from newllm.cvfp.recurrence import naive_contexts, stream_contexts

pytestmark = pytest.mark.real_model

TEXT = ("The Nile is a major north-flowing river in northeastern Africa. It flows into the "
        "Mediterranean Sea. The Nile is among the longest rivers in the world. Its drainage "
        "basin covers eleven countries. In particular, the Nile is the primary water source "
        "of Egypt, Sudan and South Sudan. The river has been an important economic lifeline "
        "since ancient times, supporting agriculture and trade along its banks. ") * 3


def test_cvfp_on_the_real_embeddings(real_assets):
    base = load_base(str(real_assets / "smollm2-135m"), device="cpu")
    embeddings = base.model.get_input_embeddings().weight.detach().float()
    ids = torch.tensor(base.tokenizer(TEXT, add_special_tokens=False)["input_ids"])
    assert len(ids) > 200
    torch.manual_seed(0)
    model = CVFPLM(CVFPConfig(embeddings.shape[0], embeddings.shape[1], num_blocks=2,
                              context_dim=32), embeddings)
    records = train_context_blocks(model, ids, ids[:60],
                                   Phase1Config(max_iterations=2, lipschitz_samples=8),
                                   tokens_per_block=80, block_data="split",
                                   init_context="zeros", generator=torch.Generator())
    for record in records:
        assert 1.0 < record["val_effective_rank"] <= 32 and record["lipschitz_max"] > 0
    # the fast cache is the seeds' per-token loop on real embeddings too
    contexts = stream_contexts(model, ids, chunk_tokens=64)
    assert torch.allclose(contexts, naive_contexts(model, ids), atol=1e-5)
    # phase 2 on the real head (49k tokens, tied and frozen) learns the repeated text
    separator = base.tokenizer.eos_token_id
    before, _, _ = evaluate(model, contexts, ids, separator, torch.device("cpu"))
    train_token_block(model, (contexts, ids), (contexts, ids), separator,
                      TrainConfig("phase2_token", 3, 32, 1e-2), torch.Generator())
    after, accuracy, _ = evaluate(model, contexts, ids, separator, torch.device("cpu"))
    assert after < before - 1.0 and accuracy > 0.1


def test_shortlist_training_and_zero_control_on_the_real_head(real_assets):
    """The shortlist softmax trains against the real 49k-token tied head (val figures on the
    full head), with real and with zero contexts (the tiny-stream test shows which wins)."""
    from newllm.cvfp.phase2 import control_contexts

    base = load_base(str(real_assets / "smollm2-135m"), device="cpu")
    embeddings = base.model.get_input_embeddings().weight.detach().float()
    ids = torch.tensor(base.tokenizer(TEXT, add_special_tokens=False)["input_ids"])
    separator = base.tokenizer.eos_token_id
    for mode in ("cvfp", "zeros"):
        torch.manual_seed(0)
        model = CVFPLM(CVFPConfig(embeddings.shape[0], embeddings.shape[1], num_blocks=1,
                                  context_dim=32), embeddings)
        contexts = control_contexts(stream_contexts(model, ids, chunk_tokens=64), mode)
        before, _, _ = evaluate(model, contexts, ids, separator, torch.device("cpu"))
        history = train_token_block(model, (contexts, ids), (contexts, ids), separator,
                                    TrainConfig("phase2_token", 4, 32, 1e-2), torch.Generator(),
                                    shortlist=64)
        assert history[-1].val_loss < before - 1.0
