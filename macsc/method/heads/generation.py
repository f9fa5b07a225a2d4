"""The generation head (CommonGen with T5; SPEC 6, paper Table 3).

The paper: "we insert enhanced representations of all conceptual prototypes after the output
features of the text encoder in T5". So the decoder cross-attends to
``[H^t ; Ĥ^image ; Ĥ^audio ; Ĥ^video]`` with the matching mask: T5's own encoder output,
unchanged, then each modality's prototypes enhanced by the network (SPEC 2).
One decoder, one output: no late fusion, no ρ and no self-balancing loss. Training is
teacher-forced cross-entropy; evaluation and prediction decode with beam search.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from macsc.errors import CheckpointError, ConfigError
from macsc.method.heads.base import (
    EvaluationContext,
    EvaluationResult,
    HeadOutput,
    TaskHead,
    register_head,
)
from macsc.method.heads.records import ExampleOutputs
from macsc.method.network import BranchRepresentations
from macsc.task import TaskSpec

#: the target id the cross-entropy ignores (the data module pads labels with it)
IGNORE_INDEX = -100
#: generated sentences shown in TensorBoard at each evaluation
SAMPLES = 5


#: the paper's decoder memory: T5's encoder output ``H^t``, then the enhanced prototypes
ENCODER_OUTPUT = "encoder_output"
#: a departure: the enhanced text ``mean_m Ĥ^t_m`` in place of ``H^t``
ENHANCED_TEXT = "enhanced_text"
DECODER_MEMORIES = (ENCODER_OUTPUT, ENHANCED_TEXT)
#: what checkpoints written before ``decoder_memory`` existed were trained with
BEFORE_THE_OPTION = ENHANCED_TEXT


def decoder_memory(
    representations: BranchRepresentations, form: str = ENCODER_OUTPUT
) -> tuple[Tensor, Tensor]:
    """What the decoder cross-attends to, ``(B, l + Σ n_m, d)``, and its mask ``(B, l + Σ n_m)``
    (the text's, then each modality's prototype mask, in ``modalities`` order).

    ``encoder_output`` (the paper's): ``[H^t ; Ĥ^image ; Ĥ^audio ; Ĥ^video]``, T5's encoder
    output unchanged, then the enhanced prototypes. ``enhanced_text`` (a departure):
    ``[mean_m Ĥ^t_m ; Ĥ^image ; ...]``, the text enhanced by the prototypes in place of ``H^t``.
    """
    if form not in DECODER_MEMORIES:
        raise ValueError(f"decoder_memory must be one of {DECODER_MEMORIES}; got {form!r}")
    text = representations.text if form == ENCODER_OUTPUT else representations.text_branch
    mask = representations.mask.bool()
    if representations.prototypes is None:
        return text, mask.long()
    prototypes = representations.prototypes.transpose(0, 1).flatten(1, 2)  # (B, Σ n_m, d)
    states = torch.cat([text, prototypes], dim=1)  # (B, l + Σ n_m, d)
    masks = representations.prototype_masks.transpose(0, 1).flatten(1, 2)  # (B, Σ n_m)
    return states, torch.cat([mask, masks], dim=1).long()


@register_head("generation")
class GenerationHead(TaskHead):
    """Drives the decoder and LM head of an encoder-decoder backbone (``T5ForConditionalGeneration``
    and family) on the encoder output followed by the enhanced prototypes.

    Options (``model.head_options``): ``num_beams`` (5), ``max_new_tokens`` (32),
    ``generate_kwargs``, any further keyword arguments of ``generate()`` (``length_penalty``,
    ``no_repeat_ngram_size``, ...), and ``decoder_memory``, what the decoder cross-attends to
    (:func:`decoder_memory`): ``encoder_output`` (the default, the paper's: ``[H^t ; Ĥ^m ...]``)
    or ``enhanced_text`` (a departure: ``[mean_m Ĥ^t_m ; Ĥ^m ...]``). Left unset, a checkpoint
    loaded into the head keeps the form it was trained with; checkpoints written before the
    option existed were trained with ``enhanced_text``.
    """

    needs_tokens = True
    uses_prior = False
    late_fusion = False
    default_lambda_msb = 0.0
    auto_class = "AutoModelForSeq2SeqLM"

    def __init__(
        self,
        spec: TaskSpec,
        num_branches: int,
        hidden_size: int,
        dropout: float = 0.0,
        num_beams: int = 5,
        max_new_tokens: int = 32,
        generate_kwargs: dict[str, Any] | None = None,
        decoder_memory: str | None = None,
    ) -> None:
        super().__init__(spec, num_branches, hidden_size, dropout)
        if num_beams < 1 or max_new_tokens < 1:
            raise ConfigError(
                f"model.head_options: num_beams={num_beams} and max_new_tokens={max_new_tokens} "
                "must be positive integers"
            )
        if decoder_memory is not None and decoder_memory not in DECODER_MEMORIES:
            raise ConfigError(
                f"model.head_options.decoder_memory must be {' or '.join(DECODER_MEMORIES)} "
                f"(the paper's: {ENCODER_OUTPUT}); got {decoder_memory!r}"
            )
        self.num_beams = num_beams
        self.max_new_tokens = max_new_tokens
        self.generate_kwargs = dict(generate_kwargs or {})
        #: whether the config named the form; if not, a loaded checkpoint's own form is kept
        self.decoder_memory_given = decoder_memory is not None
        self.decoder_memory = decoder_memory or ENCODER_OUTPUT
        self._backbone: list[nn.Module] = []  # a reference, not a submodule: the network owns it

    def attach(self, backbone: nn.Module) -> None:
        """The network's encoder-decoder backbone, whose decoder and LM head this head drives."""
        if not getattr(backbone.config, "is_encoder_decoder", False):
            raise ConfigError(
                f"a generation task needs an encoder-decoder backbone (T5, BART, ...); "
                f"{backbone.config.model_type!r} is an encoder only"
            )
        self._backbone[:] = [backbone]

    @property
    def backbone(self) -> nn.Module:
        if not self._backbone:
            raise RuntimeError("GenerationHead.attach(backbone) was not called")
        return self._backbone[0]

    def recorded_options(self) -> dict[str, Any]:
        return {"decoder_memory": self.decoder_memory}

    def restore_options(self, saved: dict[str, Any]) -> str | None:
        """Keeps the checkpoint's ``decoder_memory`` when the config names none (a checkpoint
        without one predates the option: ``enhanced_text``); refuses one that differs from the
        form the config names, since the weights were trained to read the other memory."""
        trained = saved.get("decoder_memory", BEFORE_THE_OPTION)
        origin = "" if "decoder_memory" in saved else " (it predates the option)"
        if trained not in DECODER_MEMORIES:
            raise CheckpointError(
                f"the checkpoint records model.head_options.decoder_memory {trained!r}, which "
                f"this version does not know ({' or '.join(DECODER_MEMORIES)}); load it with "
                "the macsc version that wrote it"
            )
        if trained == self.decoder_memory:
            return None
        if self.decoder_memory_given:
            raise CheckpointError(
                f"model.head_options.decoder_memory is {self.decoder_memory!r}, but the checkpoint "
                f"was trained with {trained!r}{origin}: set model.head_options.decoder_memory: "
                f"{trained}, or leave it unset"
            )
        self.decoder_memory = trained
        return (
            f"model.head_options.decoder_memory: {trained}, the form this checkpoint was "
            f"trained with{origin}"
        )

    def memory(self, representations: BranchRepresentations) -> tuple[Tensor, Tensor]:
        """What the decoder cross-attends to and its mask, in this head's form
        (:func:`decoder_memory`)."""
        return decoder_memory(representations, self.decoder_memory)

    def forward(self, representations: BranchRepresentations, batch: dict) -> HeadOutput:
        """Teacher-forced decoder logits ``(B, T, V)`` when the batch has ``labels``; an empty
        tensor otherwise (evaluation batches decode in :meth:`update_metrics`)."""
        if batch.get("labels") is None:
            return HeadOutput(representations.text.new_zeros(0))
        memory, mask = self.memory(representations)
        from transformers.modeling_outputs import BaseModelOutput

        output = self.backbone(
            encoder_outputs=BaseModelOutput(last_hidden_state=memory),
            attention_mask=mask,
            labels=batch["labels"],
            # no key/value cache in training: a cache filled in the forward pass makes the
            # recomputation of checkpointed blocks (FSDP activation checkpointing) skip the
            # cross-attention projections, and the backward pass fails
            use_cache=False,
        )
        return HeadOutput(output.logits)

    def aggregation_loss(self, outputs: Tensor, rho_logits: Tensor | None, batch: dict) -> Tensor:
        """Token cross-entropy of the references, averaged over their real tokens."""
        return F.cross_entropy(
            outputs.float().flatten(0, 1), batch["labels"].flatten(), ignore_index=IGNORE_INDEX
        )

    def evaluation_loss(self, outputs: Tensor, rho_logits: Tensor | None, batch: dict):
        return None  # evaluation batches are concept sets, without one reference to score

    def has_targets(self, batch: dict) -> bool:
        """Evaluation batches carry no targets: the references of the split are scored at the
        end of the epoch, against the decoded sentences."""
        return True

    def generate(self, representations: BranchRepresentations) -> Tensor:
        """Beam search on the decoder memory (:meth:`memory`): ``(B, T)`` token ids."""
        from transformers.modeling_outputs import BaseModelOutput

        memory, mask = self.memory(representations)
        return self.backbone.generate(
            encoder_outputs=BaseModelOutput(last_hidden_state=memory),
            attention_mask=mask,
            num_beams=self.num_beams,
            max_new_tokens=self.max_new_tokens,
            **self.generate_kwargs,
        )

    def make_metrics(self, branches: list[str]) -> nn.Module:
        return ExampleOutputs("tokens")

    def update_metrics(self, metrics, output, representations, rho_logits, batch):
        tokens = self.generate(representations)
        pad = self.backbone.config.pad_token_id or 0
        width = self.max_new_tokens + 1  # every batch the same width, so ranks can gather
        tokens = F.pad(tokens[:, :width], (0, width - min(tokens.shape[1], width)), value=pad)
        metrics.update(batch["example_index"], tokens=tokens)

    def compute_metrics(self, metrics, context: EvaluationContext) -> EvaluationResult:
        """Decodes the sentences; scores them against every reference of their concept set
        with the COCO caption toolkit on spaCy's tokens, as the official CommonGen scripts
        (:func:`macsc.commongen.metric.score_commongen`), on global rank 0 and shares the scores with the other ranks; records one line per concept set."""
        generated = metrics.compute()
        metrics.reset()
        datamodule = context.datamodule
        sets = datamodule.generation_references(context.stage, context.split)
        sentences = datamodule.tokenizer.batch_decode(generated["tokens"], skip_special_tokens=True)
        predictions = {
            int(index): sentence.strip()
            for index, sentence in zip(generated["index"].tolist(), sentences, strict=True)
        }
        values: dict[str, float] = {}
        if context.stage != "predict" and sets.labelled and not context.sanity_check:
            values = sets.score(predictions) if context.is_global_zero else {}
            values = context.share(values)
        shown = sorted(predictions)[:SAMPLES]
        samples = [
            f"{' '.join(sets.concepts[i])} → {predictions[i]}"
            + (f" (reference: {sets.references[i][0]})" if sets.references[i] else "")
            for i in shown
        ]
        return EvaluationResult(values, sets.records(predictions), samples=samples)
