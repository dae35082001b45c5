"""build-e-star: per-example optimized virtual tokens e* for (text, follow_text) pairs.

Pairs are a document's first `text_tokens` tokens and the `follow_tokens` after them;
training pairs come from train documents, held-out pairs from val documents only. Writes
`<out_dir>/train.safetensors` and `<out_dir>/val.safetensors` (kind `virtual-token-e-star`):
per pair the text's hidden states at `context_hidden_index` (the compressor's input, the
separator's state left out), the teacher's top-`teacher_topk` log-probabilities and ids at
the follow positions (what train-compressor's KL term needs), the teacher's hidden states
there at `hidden_loss_index` and the no-context KL (follow_text after the separator alone);
and, for every held-out pair and a seeded subset of `e_star_samples` training pairs
(`has_e_star`), e* and its final KL. The teacher is one forward pass per pair, an e* is
`steps` forward and backward passes: so the compressors train on many pairs (KL) and regress
to e* where one exists. With `objective: reconstruct` the e* reproduce the text itself instead
(the cramming setting) and the metrics give token accuracy and greedy exact-match length.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import click
import torch

from newllm.core.artifacts import atomic_dir, save_artifact, write_csv, write_metrics
from newllm.core.base import BaseParams
from newllm.core.cli import stage_command
from newllm.core.data import load_split
from newllm.core.errors import NewllmError
from newllm.core.frozen import check_unchanged, freeze
from newllm.core.hidden import resolve_layer_index
from newllm.core.params import as_dict, param
from newllm.core.runtime import seed_everything
from newllm.core.tokens import separator_token_id
from newllm.core.train import COMPUTE_DTYPES
from newllm.virtual_tokens.e_star import (
    E_STAR_KIND,
    HIDDEN_LOSSES,
    INITS,
    OBJECTIVES,
    EStarConfig,
    check_context_fits,
    make_pairs,
    no_context_kl,
    optimize_e_star,
    pad_ids,
    reconstruction_metrics,
    teacher_outputs,
)


@dataclass
class BuildEStarParams:
    group = "build_e_star"
    data: str = param("data/prepared", "Prepared data (prepare-data): train pairs from train "
                      "documents, held-out pairs from val documents.")
    objective: str = param("continue", "continue: [sep, e*, follow] matches the teacher "
                           "[sep, text, follow] on the follow positions (KL); reconstruct: "
                           "[sep, e*] reproduces the text itself.", choices=OBJECTIVES)
    num_virtual: int = param(1, "Virtual tokens k per text.", min=1)
    steps: int = param(20, "Adam steps per batch of examples.", min=1)
    lr: float = param(0.1, "Adam learning rate of e* (cosine-decayed to 0).", min=1e-12)
    num_samples: int = param(256, "Training pairs (train documents): each stores its text's "
                             "context hidden states and the teacher's top-K (one forward "
                             "pass), what train-compressor's KL term needs.", min=1)
    e_star_samples: int = param(24, "Training pairs that also get an optimized e* (a seeded "
                                "subset of num_samples): the regression targets of "
                                "train-compressor and the constant controls of "
                                "eval-compressor.", min=1)
    val_samples: int = param(64, "Held-out pairs (val documents only), each with its e* (the "
                             "per-pair oracle).", min=2)
    text_tokens: int = param(32, "Tokens of the text to compress.", min=1)
    follow_tokens: int = param(8, "Tokens of follow_text (continue objective).", min=1)
    init: str = param("mean_embedding", "Start of e*: the mean input embedding, or the mean "
                      "embedding of each of k chunks of the text.", choices=INITS)
    hidden_weight: float = param(0.0, "Weight of the hidden-state match on the follow "
                                 "positions (continue).", min=0.0)
    hidden_loss_index: int = param(-2, "Hidden state of the hidden-state match (and stored "
                                   "for train-compressor): an index of HF's hidden_states (0 = "
                                   "embeddings, -1 = last), not a decoder layer index.")
    hidden_loss_type: str = param("cosine", "Hidden-state mismatch.", choices=HIDDEN_LOSSES)
    context_hidden_index: int = param(-2, "Hidden state of the text stored as the "
                                      "compressor's input: an index of HF's hidden_states (0 = "
                                      "embeddings, -1 = last), not a decoder layer index.")
    teacher_topk: int = param(64, "Teacher log-probabilities kept per follow position for "
                              "train-compressor's KL (top-K plus one bucket for the rest).",
                              min=1)
    batch_size: int = param(24, "Examples optimized together in one batch.", min=1)
    compute_dtype: str = param("float32", "Precision of the base's forward (bfloat16: "
                               "autocast).", choices=COMPUTE_DTYPES)
    seed: int = param(0, "Seed of the choice of documents.", min=0)
    out_dir: str = param("artifacts/e_star", "Output folder: train.safetensors, "
                         "val.safetensors.", output="dir")
    metrics: str = param("metrics/e_star/build.json", "Metrics JSON.", output="metrics")
    plot: str = param("plots/e_star/loss.csv", "Mean loss per step (plot data).", output="plot")

    def check(self) -> None:
        if self.e_star_samples > self.num_samples:
            raise NewllmError(f"build_e_star.e_star_samples ({self.e_star_samples}) must not "
                              f"exceed num_samples ({self.num_samples}): the pairs with an e* "
                              "are a subset of the training pairs.")


def _mean(values: torch.Tensor) -> float:
    return round(values.float().mean().item(), 6)


@stage_command("build-e-star", BaseParams, BuildEStarParams,
               help="Optimize k virtual tokens e* per (text, follow_text) pair of the prepared "
                    "corpus so that the frozen base reading [sep, e*, follow_text] matches its "
                    "own distributions after [sep, text, follow_text] (KL), or reproduces the "
                    "text (objective reconstruct); many pairs per batch. Saves e*, the text's "
                    "context hidden states and the teacher's top-K for train-compressor.")
def build_e_star(base_params: BaseParams, params: BuildEStarParams) -> None:
    base = base_params.load()
    model, num_layers = base.model, base.info.num_layers
    for key in ("hidden_loss_index", "context_hidden_index"):
        resolve_layer_index(getattr(params, key), num_layers, f"build_e_star.{key}")
    continue_mode = params.objective == "continue"
    length = 1 + params.text_tokens + (params.follow_tokens if continue_mode else 0)
    check_context_fits(model, length, "1 + build_e_star.text_tokens"
                       + (" + follow_tokens" if continue_mode else ""))
    config = EStarConfig(params.objective, params.num_virtual, params.steps, params.lr,
                         params.init, params.hidden_weight, params.hidden_loss_index,
                         params.hidden_loss_type, params.batch_size, params.compute_dtype)
    seed_everything(params.seed)
    sep_id = separator_token_id(base.tokenizer, base_params.separator_token)
    follow_len = params.follow_tokens if continue_mode else 0
    splits = {}
    for split, count, seed in (("train", params.num_samples, params.seed),
                               ("val", params.val_samples, params.seed + 1)):
        docs, _ = load_split(params.data, split, base=base.info.tokenizer_only()).documents()
        splits[split] = make_pairs(docs, count, params.text_tokens, follow_len, seed,
                                   f"build_e_star.data '{params.data}' {split} split")

    frozen = freeze(model)
    metrics: dict = {"objective": params.objective, "num_virtual": params.num_virtual,
                     "text_tokens": params.text_tokens, "steps": params.steps,
                     "compression_ratio": params.text_tokens / params.num_virtual}
    if continue_mode:
        metrics["follow_tokens"] = params.follow_tokens
    # which pairs get an e*: every held-out pair, a seeded subset of the training pairs
    order = torch.randperm(len(splits["train"]),
                           generator=torch.Generator().manual_seed(params.seed + 2))
    with_e_star = {"train": sorted(order[:params.e_star_samples].tolist()),
                   "val": list(range(len(splits["val"])))}
    # train and held-out pairs are optimized in the same batches: every pair's e* is its
    # own optimization (see optimize_batch), so sharing a batch only saves time
    chosen = [(split, i) for split, rows in with_e_star.items() for i in rows]
    all_texts = [splits[split][i][1] for split, i in chosen]
    all_follows = [splits[split][i][2] for split, i in chosen] if continue_mode else None
    start_all = time.perf_counter()
    everything = optimize_e_star(model, config, sep_id, all_texts, all_follows)
    metrics["optimize_seconds"] = round(time.perf_counter() - start_all, 2)
    histories, offset = {}, 0
    with atomic_dir(params.out_dir) as out:
        for split, pairs in splits.items():
            rows = with_e_star[split]
            optimized = slice(offset, offset + len(rows))
            offset += len(rows)
            texts = [t for _, t, _ in pairs]
            follows = [f for _, _, f in pairs] if continue_mode else None
            has = torch.zeros(len(pairs), dtype=torch.bool)
            has[rows] = True
            e_star = torch.zeros(len(pairs), *everything.e_star.shape[1:])
            e_star[rows] = everything.e_star[optimized]
            initial = torch.full((len(pairs),), float("nan"))
            initial[rows] = everything.initial_loss[optimized]
            final = torch.full((len(pairs),), float("nan"))
            final[rows] = everything.final_loss[optimized]
            histories[split] = everything.row_history[:, optimized].mean(dim=1).tolist()
            text_ids, text_len = pad_ids(texts)
            tensors = {"e_star": e_star, "has_e_star": has, "text_ids": text_ids,
                       "text_len": text_len, "doc_index": torch.tensor([i for i, _, _ in pairs]),
                       "initial_loss": initial}
            metrics[f"{split}_pairs"] = len(pairs)
            metrics[f"{split}_e_star_pairs"] = len(rows)
            teacher_chunks = []
            for begin in range(0, len(texts), params.batch_size):
                end = begin + params.batch_size
                teacher = teacher_outputs(
                    model, sep_id, texts[begin:end],
                    follows[begin:end] if follows else [t[:1] for t in texts[begin:end]],
                    hidden_layer=params.hidden_loss_index if continue_mode else None,
                    context_layer=params.context_hidden_index,
                    compute_dtype=params.compute_dtype)
                chunk = {"context": teacher.context_hidden}
                if continue_mode:
                    top = teacher.logp.topk(min(params.teacher_topk, teacher.logp.shape[-1]),
                                            dim=-1)
                    chunk |= {"logp": top.values.cpu(), "ids": top.indices.cpu(),
                              "hidden": teacher.hidden.cpu(),
                              "no_context": no_context_kl(model, sep_id, follows[begin:end],
                                                          teacher, params.compute_dtype)}
                teacher_chunks.append(chunk)
            context = torch.nn.utils.rnn.pad_sequence(
                [c.cpu() for chunk in teacher_chunks for c in chunk["context"]],
                batch_first=True)
            tensors["context_hidden"] = context
            if continue_mode:
                follow_ids, follow_lens = pad_ids(follows)
                no_context = torch.cat([c["no_context"] for c in teacher_chunks])
                tensors |= {
                    "follow_ids": follow_ids, "follow_len": follow_lens,
                    "teacher_topk_logp": torch.cat([c["logp"] for c in teacher_chunks]),
                    "teacher_topk_ids": torch.cat([c["ids"] for c in teacher_chunks]),
                    "teacher_hidden": torch.cat([c["hidden"] for c in teacher_chunks]),
                    "final_kl": final, "no_context_kl": no_context}
                metrics |= {f"{split}_initial_kl": _mean(initial[has]),
                            f"{split}_final_kl": _mean(final[has]),
                            f"{split}_no_context_kl": _mean(no_context),
                            f"{split}_below_no_context": _mean(
                                (final[has] < no_context[has]).float())}
            else:
                accuracy, exact = reconstruction_metrics(model, sep_id, e_star[has],
                                                         [texts[i] for i in rows],
                                                         params.compute_dtype)
                tensors |= {"final_ce": final}
                metrics |= {f"{split}_final_ce": _mean(final[has]),
                            f"{split}_token_accuracy": _mean(accuracy),
                            f"{split}_greedy_exact_len": _mean(exact),
                            f"{split}_exact_fraction": _mean(exact == text_len[has])}
            save_artifact(out / f"{split}.safetensors", tensors, kind=E_STAR_KIND,
                          stage="build-e-star", params=as_dict(base_params, params),
                          base=base.info.as_dict(),
                          extra={"objective": params.objective, "separator_token_id": sep_id,
                                 "num_virtual": params.num_virtual,
                                 "hidden_layer_index": resolve_layer_index(
                                     params.hidden_loss_index, num_layers),
                                 "context_layer_index": resolve_layer_index(
                                     params.context_hidden_index, num_layers),
                                 "split": split})
        check_unchanged(model, frozen, "build-e-star")  # inside: a failure writes nothing
    metrics["seconds"] = round(time.perf_counter() - start_all, 2)
    write_metrics(params.metrics, metrics)
    write_csv(Path(params.plot), ["step", "train_loss", "val_loss"],
              [[s + 1, f"{a:.6g}", f"{b:.6g}"] for s, (a, b) in
               enumerate(zip(histories["train"], histories["val"], strict=True))])
    name = "KL" if continue_mode else "CE"
    summary = ", ".join(f"{k} {v}" for k, v in metrics.items() if k.startswith("val_"))
    click.echo(f"build-e-star ({params.objective}, k={params.num_virtual}, {name}): {summary}; "
               f"{metrics['seconds']}s")
