"""The MaCSC LightningModule: composes the backbone, prototype enhancement, per-modality heads,
late fusion and the self-balancing calibration (SPEC sections 2-5 and 7)."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from .calibration import SelfBalancingCalibration
from .errors import CheckpointError, ConfigError, NonFiniteLossError
from .fusion import ConceptEnhancer, masked_mean, sentence_pool, sentence_positions
from .heads import EvaluationContext, build_task_head
from .paths import resolve_pretrained
from .prototypes import PrototypeExtractor, Prototypes, build_extractor
from .run_state import RunState
from .task import TaskSpec

#: SPEC section 1: the paper's extractor for each non-text modality
DEFAULT_PROTOTYPES: dict[str, dict[str, Any]] = {
    "image": {"kind": "open_clip", "model_name": "ViT-B-32", "pretrained": "openai"},
    "audio": {"kind": "audioclip", "checkpoint": "checkpoints/AudioCLIP-Full-Training.pt"},
    "video": {"kind": "clip_vip", "checkpoint": "checkpoints/pretrain_clipvip_base_32.pt"},
}
NONFINITE_POLICIES = ("raise", "skip")


def _check_modalities(modalities: list[str], prototypes: dict[str, dict[str, Any]]) -> None:
    if not modalities or modalities[0] != "text":
        raise ConfigError(
            f"model.modalities must start with 'text' (e.g. [text, image, audio, video]); "
            f"got {modalities}"
        )
    if len(set(modalities)) != len(modalities):
        raise ConfigError(f"model.modalities lists a modality twice: {modalities}")
    unknown = [m for m in modalities[1:] if m not in prototypes and m not in DEFAULT_PROTOTYPES]
    if unknown:
        raise ConfigError(
            f"unknown modality {unknown[0]!r} in model.modalities: known ones are "
            f"{['text', *DEFAULT_PROTOTYPES]}; for a new one give its source in "
            f"model.prototypes.{unknown[0]} (e.g. {{kind: gaussian, dim: 512}})"
        )


class MaCSC(L.LightningModule):
    """MaCSC fine-tuning of any Hugging Face encoder.

    Args:
        backbone: Hugging Face model name or local folder of the PLM (``bert-base-uncased``).
        modalities: ``[text]``, ``[text, image]``, ... ``text`` first. ``[text]`` with
            ``lambda_msb: 0`` is the plain fine-tuning baseline ("+None").
        prototypes: the prototype source of each non-text modality, as keyword options of
            :func:`macsc.prototypes.build_extractor` (``{image: {kind: open_clip, ...}}``);
            modalities not listed use the paper's extractors (SPEC section 1).
        task: filled in by the data module (kind, number of labels, metrics); see
            :class:`macsc.task.TaskSpec`.
        enhancement: ``false`` is the "w/o Concept Enhancement" ablation.
        share_enhancer: one attention block for all modalities instead of one each.
        enhancer_heads: attention heads of the enhancement module (paper: 8).
        enhancer_feed_forward: add a feed-forward block after the enhancement attention.
        text_pooling: ``auto`` (first token, or last for XLNet), ``first``, ``last``, ``mean``.
        lambda_msb: weight of the self-balancing loss (Eq. 14; paper 0.2).
        alpha: strength of the class-prior debiasing of Eq. 4.
        tau: contrastive temperature of Eq. 7.
        proj_dim: width of the contrastive projectors.
        weight_normalization: ``positives`` (default) or ``batch`` (Eq. 5 literally); see SPEC 5.
        reduction: ``mean`` or ``sum`` over anchors (Eq. 8 sums).
        gather_across_devices: all-gather features and predictions under DDP so that positives
            and negatives span the global batch.
        learning_rate, weight_decay, warmup_ratio, adam_epsilon: AdamW with linear warm-up and
            linear decay to zero.
        modality_weight_lr_scale: learning-rate multiplier for the modality weights rho and Z
            (the paper uses one learning rate: 1.0; short runs may want them to move faster).
        dropout: dropout before the heads and in the enhancer (default: the backbone's).
        nonfinite: ``raise`` stops training on a NaN/Inf loss term, naming it and the step
            (checked without a host sync in the step: at the next ``log_every_n_steps``, and
            always before a checkpoint is written); ``skip`` drops that batch on every rank (its
            gradient is zero; an update made of skipped batches only is not applied) and logs
            ``train/skipped_batches`` (one host sync per step).
        backbone_kwargs: extra keyword arguments of ``AutoModel.from_pretrained``.
    """

    def __init__(
        self,
        backbone: str = "bert-base-uncased",
        modalities: list[str] | None = None,
        prototypes: dict[str, dict[str, Any]] | None = None,
        task: dict[str, Any] | None = None,
        enhancement: bool = True,
        share_enhancer: bool = False,
        enhancer_heads: int = 8,
        enhancer_feed_forward: bool = False,
        text_pooling: str = "auto",
        lambda_msb: float = 0.2,
        alpha: float = 1.0,
        tau: float = 0.1,
        proj_dim: int = 128,
        weight_normalization: str = "positives",
        reduction: str = "mean",
        gather_across_devices: bool = False,
        learning_rate: float = 1e-4,
        weight_decay: float = 0.01,
        warmup_ratio: float = 0.1,
        adam_epsilon: float = 1e-8,
        modality_weight_lr_scale: float = 1.0,
        dropout: float | None = None,
        nonfinite: str = "raise",
        backbone_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        modalities = (
            list(modalities) if modalities is not None else ["text", "image", "audio", "video"]
        )
        prototypes = copy.deepcopy(prototypes or {})
        _check_modalities(modalities, prototypes)
        if nonfinite not in NONFINITE_POLICIES:
            raise ConfigError(
                f"model.nonfinite must be one of {NONFINITE_POLICIES}, got {nonfinite!r}"
            )
        self.save_hyperparameters()
        self.modalities = modalities
        self.spec = TaskSpec.from_dict(task)
        # from_pretrained returns eval mode, and Lightning keeps modules' modes: dropout must be on
        self.backbone = _load_backbone(backbone, backbone_kwargs or {}).train()
        if getattr(self.backbone, "pooler", None) is not None:
            self.backbone.pooler = None  # unused (we pool ourselves); DDP rejects unused parameters
        config = self.backbone.config
        hidden = config.hidden_size if hasattr(config, "hidden_size") else config.d_model
        if dropout is None:
            dropout = float(
                getattr(config, "hidden_dropout_prob", getattr(config, "dropout", 0.1)) or 0.1
            )
        self.text_pooling = (
            ("last" if config.model_type == "xlnet" else "first")
            if text_pooling == "auto"
            else text_pooling
        )
        sentence_pool(
            torch.zeros(1, 1, 1), torch.ones(1, 1), self.text_pooling
        )  # validates the option

        self._frozen_extractors: dict[str, PrototypeExtractor] = {}
        self.trainable_extractors = nn.ModuleDict()
        self.enhancers = nn.ModuleDict()
        for name in modalities[1:]:
            # a source given in the config replaces the default one whole (options differ by kind)
            spec = prototypes.get(name) or DEFAULT_PROTOTYPES[name]
            extractor = _build_source(name, spec)
            if extractor.trainable:
                self.trainable_extractors[name] = extractor
            else:
                self._frozen_extractors[name] = extractor.eval()
            self.enhancers[name] = ConceptEnhancer(
                hidden,
                extractor.dim,
                num_heads=enhancer_heads,
                dropout=dropout,
                feed_forward=enhancer_feed_forward,
                enhancement=enhancement,
            )
        if share_enhancer and enhancement and len(self.enhancers) > 1:
            first = next(iter(self.enhancers.values()))
            for enhancer in self.enhancers.values():
                enhancer.attention, enhancer.norm = first.attention, first.norm
                enhancer.feed_forward, enhancer.ff_norm = first.feed_forward, first.ff_norm

        self.dropout = nn.Dropout(dropout)
        self.head = build_task_head(self.spec, len(modalities), hidden)
        self.rho_logits = nn.Parameter(torch.zeros(len(modalities)))
        # no calibration parameters at all when L_msb is off: DDP rejects unused parameters
        self.calibration = (
            SelfBalancingCalibration(
                modalities, hidden, proj_dim, tau, weight_normalization, reduction
            )
            if lambda_msb != 0 and len(modalities) > 1
            else None
        )
        self.register_buffer(
            "class_prior", torch.full((self.head.prior_size,), 1.0 / self.head.prior_size)
        )
        self.alpha = alpha if self.head.uses_prior else 0.0
        self.register_buffer(
            "_agreement_sum", torch.zeros(len(modalities) * (len(modalities) - 1)), persistent=False
        )
        self.register_buffer("_agreement_count", torch.zeros(()), persistent=False)
        self.register_buffer("skipped_batches", torch.zeros((), dtype=torch.long))
        # plain attributes, not buffers: DDP would overwrite every rank's record with rank 0's
        self._nonfinite_step: Tensor | None = None
        self._nonfinite_terms: Tensor | None = None
        self._clean_batches = 0  # finite batches since the last optimizer step (nonfinite: skip)
        self._checkpoint_hparams: dict[str, Any] = {}
        self._updated: set[str] = set()
        self.metrics = nn.ModuleDict(
            {
                _metric_prefix(stage, name, self.spec.val_names): nn.ModuleDict(
                    {branch: self.head.make_metrics() for branch in ["fused", *modalities]}
                )
                for stage in ("val", "test")
                for name in self.spec.val_names
            }
        )

    # ----------------------------------------------------------------- what the data needs
    @property
    def backbone_name(self) -> str:
        """Where the backbone (and so its tokenizer) was loaded from."""
        return resolve_pretrained(self.hparams.backbone)

    @property
    def extractors(self) -> dict[str, PrototypeExtractor]:
        """The prototype source of every non-text modality, in ``modalities`` order."""
        return {
            m: self._frozen_extractors.get(m) or self.trainable_extractors[m]
            for m in self.modalities[1:]
        }

    def setup(self, stage: str) -> None:
        datamodule = (
            getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        )
        if stage == "fit" and datamodule is not None and hasattr(datamodule, "train_label_classes"):
            from .allocation import class_prior

            classes = datamodule.train_label_classes()
            self.class_prior.copy_(class_prior(classes, self.head.prior_size).to(self.class_prior))

    # ----------------------------------------------------------------------------- forward
    def _prototypes(self, batch: dict, name: str) -> Prototypes:
        stored = batch.get("prototypes", {}).get(name)
        if stored is not None:
            return Prototypes(stored["features"], stored["mask"])
        if "segments" not in batch:
            raise ConfigError(
                f"the batch has no prototypes for modality {name!r} and no raw 'segments' to "
                "extract them from; use a macsc data module (tasks.*) connected to this model"
            )
        extractor = self.extractors[name]
        parts = [extractor.extract(list(texts)) for texts in batch["segments"]]
        features = torch.cat([p.features for p in parts], dim=1).to(self.device)
        return Prototypes(features, torch.cat([p.mask for p in parts], dim=1).to(self.device))

    def forward(self, batch: dict) -> dict[str, Tensor]:
        """Returns ``outputs`` (every branch's raw head output, leading dim ``M``) and
        ``pooled`` ``(M, B, d)``, the pooled branch representations."""
        inputs = {
            k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch
        }
        text = self.backbone(**inputs).last_hidden_state
        mask = batch["attention_mask"]
        # a pooling head reads one row of each H^t_m: the enhancers then compute only that row
        rows = None if self.head.needs_tokens else sentence_positions(mask, self.text_pooling)
        enhanced_text, prototype_pooled = [], []
        for name in self.modalities[1:]:
            prototypes = self._prototypes(batch, name)
            text_m, proto_m = self.enhancers[name](
                text, mask, prototypes.features, prototypes.mask, text_rows=rows
            )
            enhanced_text.append(text_m)
            prototype_pooled.append(masked_mean(proto_m, prototypes.mask).to(text.dtype))
        text_branch = torch.stack(enhanced_text).mean(0) if enhanced_text else text
        pooled_text = (
            text_branch[:, 0]  # the enhanced text holds only the sentence position's row
            if enhanced_text and rows is not None
            else sentence_pool(text_branch, mask, self.text_pooling)
        )
        pooled = torch.stack([pooled_text, *prototype_pooled])
        tokens = None
        if self.head.needs_tokens:
            tokens = self.dropout(torch.stack([text, *enhanced_text]))
        return {"outputs": self.head(self.dropout(pooled), tokens), "pooled": pooled}

    # --------------------------------------------------------------------------- objective
    def compute_losses(self, batch: dict, forward: dict[str, Tensor]) -> dict[str, Any]:
        outputs = forward["outputs"]
        wa = self.head.aggregation_loss(outputs, self.rho_logits, batch)
        result: dict[str, Any] = {"wa": wa}
        if self.calibration is None:
            result["total"] = wa
            return result
        features = self.calibration.project(forward["pooled"])
        distributions = self.head.allocation_distributions(
            outputs, self.class_prior, self.alpha, batch
        )
        keys = self.head.positive_keys(batch)
        if self.hparams.gather_across_devices:
            features, distributions, keys = self._gather(features, distributions, keys)
        positives = keys.unsqueeze(0) == keys.unsqueeze(1)
        calibration = self.calibration(features, distributions, positives)
        result.update(
            msb=calibration.loss,
            pairs=calibration.pair_losses,
            pi_z=calibration.pi_z,
            agreement=calibration.agreement,
            total=wa + self.hparams.lambda_msb * calibration.loss,
        )
        return result

    def _gather(
        self, features: Tensor, distributions: Tensor, keys: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """All-gather along the batch; gradients flow through this rank's own slice.

        Every rank then computes the same ``L_msb`` over the global batch, and this rank's
        features get ``dL/df_rank`` only. DDP averages gradients over the ``W`` ranks, so the
        local slice's gradient is scaled by ``W`` (its value is unchanged): the averaged gradient
        is then exactly that of the single-process loss on the concatenated batch. The ranks'
        batches have one size because the training samplers pad every rank to the same number
        of examples (:class:`tasks.sampling.ResumableSampler`), so the all-gather cannot stall.
        """
        world = self.trainer.world_size
        if world < 2:
            return features, distributions, keys
        rank = self.trainer.global_rank
        local = features + (features - features.detach()) * (world - 1)
        gathered = self.all_gather(features.detach().transpose(0, 1).contiguous())  # (W, B, M, D)
        gathered = torch.cat(
            [local.transpose(0, 1) if r == rank else gathered[r] for r in range(world)]
        )
        dists = self.all_gather(distributions.transpose(0, 1).contiguous()).flatten(0, 1)
        offset = torch.arange(self.trainer.world_size, device=keys.device).repeat_interleave(
            keys.numel()
        )
        all_keys = self.all_gather(keys).flatten()
        if self.head.identity_positives:
            all_keys = all_keys + offset * keys.numel()
        return gathered.transpose(0, 1), dists.transpose(0, 1), all_keys

    def training_step(self, batch: dict, batch_idx: int) -> Tensor | None:
        losses = self.compute_losses(batch, self(batch))
        terms = self._loss_terms(losses)
        if self.hparams.nonfinite == "skip":
            if self._skip_nonfinite(terms):
                return self._no_gradient_loss()
            self._clean_batches += 1
        else:
            self._note_nonfinite(terms)
        self._log_training(losses, batch["input_ids"].shape[0])
        return losses["total"]

    # ----------------------------------------------------------------- non-finite loss terms
    @property
    def loss_term_names(self) -> list[str]:
        """Names of the loss terms checked for NaN/Inf, in :meth:`_loss_terms` order."""
        if self.calibration is None:
            return ["wa"]
        return ["wa", "msb", *(f"pair {m}->{k}" for m, k in self.calibration.pair_names)]

    def _loss_terms(self, losses: dict[str, Any]) -> Tensor:
        """``(T,)`` detached float values of the terms of :attr:`loss_term_names`."""
        values = [losses["wa"].detach().float().reshape(1)]
        if self.calibration is not None:
            values += [losses["msb"].detach().float().reshape(1), losses["pairs"].detach().float()]
        return torch.cat(values)

    def _note_nonfinite(self, terms: Tensor) -> None:
        """``nonfinite: raise``: remember the first step with a NaN/Inf term and which terms,
        on the device and without waiting for it (no host sync in the step); the record is
        read by :meth:`_raise_if_nonfinite` every ``log_every_n_steps``, before any checkpoint
        is written, and at the end of training."""
        bad = ~torch.isfinite(terms)
        if self._nonfinite_step is None or self._nonfinite_step.device != terms.device:
            self._nonfinite_step = torch.full((), -1, dtype=torch.long, device=terms.device)
            self._nonfinite_terms = torch.zeros_like(bad)
        first = bad.any() & (self._nonfinite_step < 0)
        step = torch.full_like(self._nonfinite_step, self.global_step)
        self._nonfinite_step = torch.where(first, step, self._nonfinite_step)
        self._nonfinite_terms = torch.where(first, bad, self._nonfinite_terms)

    def _raise_if_nonfinite(self) -> None:
        """Raise :class:`NonFiniteLossError` if any rank recorded a NaN/Inf term (one host sync;
        every rank calls it at the same point, so the all-gather is safe)."""
        if self._nonfinite_step is None:
            return
        record = torch.cat([self._nonfinite_step.view(1), self._nonfinite_terms.long()])
        record = self.all_gather(record) if self.trainer.world_size > 1 else record[None]
        record = record.cpu()
        seen = record[record[:, 0] >= 0]
        if not len(seen):
            return
        first = seen[seen[:, 0].argmin()]
        names = [n for n, bad in zip(self.loss_term_names, first[1:].tolist(), strict=True) if bad]
        raise NonFiniteLossError(
            f"non-finite loss term(s) {names} at global step {int(first[0])} (found at step "
            f"{self.global_step}, epoch {self.current_epoch}; no checkpoint was written after "
            "it); lower the learning rate, check the data, or set model.nonfinite: skip to "
            "skip such batches"
        )

    def _skip_nonfinite(self, terms: Tensor) -> bool:
        """``nonfinite: skip``: whether to skip this batch. This policy must decide now, so it
        costs one host sync per step; under DDP every rank skips when any rank must, or the
        ranks' gradient all-reduces would no longer pair up."""
        bad = (~torch.isfinite(terms)).any()
        if self.trainer.world_size > 1:
            bad = self.trainer.strategy.reduce(bad.float(), reduce_op="sum") > 0
        if not bool(bad):
            return False
        self.skipped_batches += 1
        self.log("train/skipped_batches", self.skipped_batches.float(), on_step=True)
        finite = torch.isfinite(terms).tolist()
        names = [n for n, ok in zip(self.loss_term_names, finite, strict=True) if not ok]
        rank_zero_warn(
            f"skipped the batch of global step {self.global_step}: non-finite loss term(s) "
            f"{names or '(on another rank)'} (model.nonfinite: skip)"
        )
        return True

    def _no_gradient_loss(self) -> Tensor:
        """What a skipped batch returns: zero, reaching every trainable weight with a zero
        gradient. Lightning refuses ``None`` under DDP, and every rank must run the backward
        (with its gradient all-reduce) anyway."""
        weights = [p.sum() for p in self.parameters() if p.requires_grad]
        return torch.stack(weights).sum() * 0.0

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        # nonfinite: skip, and every batch since the last update was skipped: drop the zero
        # gradients, so that AdamW leaves each weight and its moments exactly as they were
        if self.hparams.nonfinite == "skip" and self._clean_batches == 0:
            for group in optimizer.param_groups:
                for parameter in group["params"]:
                    parameter.grad = None
        self._clean_batches = 0

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.global_step % max(1, self.trainer.log_every_n_steps) == 0:
            self._raise_if_nonfinite()

    def on_train_end(self) -> None:
        self._raise_if_nonfinite()

    def _log_training(self, losses: dict[str, Any], batch_size: int) -> None:
        log = dict(on_step=True, on_epoch=False, batch_size=batch_size)
        self.log("loss/total", losses["total"], prog_bar=True, **log)
        if "agreement" in losses:
            self._agreement_sum += losses["agreement"].detach()
            self._agreement_count += 1
        if not self._logger_writes_this_step():
            return
        values = {"loss/wa": losses["wa"]}
        rho = torch.softmax(self.rho_logits.detach(), 0)
        values.update({f"weights/rho/{m}": rho[i] for i, m in enumerate(self.modalities)})
        if "msb" in losses:
            values["loss/msb"] = losses["msb"]
            index = {m: i for i, m in enumerate(self.modalities)}
            for (m, k), pair_loss in zip(self.calibration.pair_names, losses["pairs"], strict=True):
                values[f"loss/pair/{m}->{k}"] = pair_loss
                values[f"weights/pair/{m}->{k}"] = losses["pi_z"][index[m], index[k]]
        if self.trainer.optimizers:
            values["lr"] = torch.tensor(self.trainer.optimizers[0].param_groups[0]["lr"])
        self.log_dict(
            {k: v.detach() if isinstance(v, Tensor) else v for k, v in values.items()}, **log
        )

    def _logger_writes_this_step(self) -> bool:
        """Whether the logger writes this training step's values: every ``log_every_n_steps``,
        by Lightning's own rule. The ~30 ``self.log`` calls of the other steps would cost time
        (noticeable beside a fast GPU step) for values nobody sees; the progress bar's
        ``loss/total`` is logged every step."""
        connector = getattr(self.trainer, "_logger_connector", None)
        if connector is None or not hasattr(type(connector), "should_update_logs"):
            return True
        return bool(connector.should_update_logs or self.trainer.fast_dev_run)

    # -------------------------------------------------------------------------- evaluation
    def _evaluate(self, stage: str, batch: dict, dataloader_idx: int) -> None:
        forward = self(batch)
        outputs = forward["outputs"]
        prefix = _metric_prefix(stage, self.spec.val_names[dataloader_idx], self.spec.val_names)
        if not self.head.has_targets(batch):
            return
        self._updated.add(prefix)
        self.head.update_metrics(self.metrics[prefix], outputs, self.rho_logits, batch)
        loss = self.head.aggregation_loss(outputs, self.rho_logits, batch)
        self.log(
            f"{prefix}/loss",
            loss,
            on_epoch=True,
            batch_size=batch["input_ids"].shape[0],
            add_dataloader_idx=False,
        )

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluate("val", batch, dataloader_idx)

    def test_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluate("test", batch, dataloader_idx)

    def _log_metrics(self, stage: str) -> None:
        for name in self.spec.val_names:
            prefix = _metric_prefix(stage, name, self.spec.val_names)
            if prefix not in self._updated:
                continue
            self._updated.discard(prefix)
            log_dir = self.trainer.log_dir if self._trainer is not None else None
            context = EvaluationContext(
                stage,
                name,
                getattr(self.trainer, "datamodule", None),
                Path(log_dir) if log_dir else None,
            )
            values = self.head.compute_metrics(self.metrics[prefix], context)
            self.log_dict(
                {f"{prefix}/{metric}": value for metric, value in values.items() if "/" in metric}
            )
            self.log_dict(
                {
                    f"{prefix}/{metric}": value
                    for metric, value in values.items()
                    if "/" not in metric
                },
                prog_bar=True,
            )

    def on_validation_epoch_end(self) -> None:
        self._log_metrics("val")
        self._log_heatmaps()

    def on_test_epoch_end(self) -> None:
        self._log_metrics("test")

    def predict_step(
        self, batch: dict, batch_idx: int, dataloader_idx: int = 0
    ) -> dict[str, Tensor]:
        outputs = self(batch)["outputs"]
        predictions = {"fused": self.head.fused_prediction(outputs, self.rho_logits)}
        for index, name in enumerate(self.modalities):
            predictions[name] = self.head.branch_prediction(outputs, index)
        return predictions

    def _log_heatmaps(self) -> None:
        experiment = getattr(self.logger, "experiment", None)
        if (
            self.trainer.sanity_checking
            or not hasattr(experiment, "add_figure")
            or self.calibration is None
        ):
            return
        if self.global_rank != 0:
            return
        from .allocation import coarse_weights
        from .calibration import ordered_pairs
        from .visualize import pair_heatmap

        size = len(self.modalities)
        pi_z = coarse_weights(self.calibration.z.detach())
        experiment.add_figure(
            "weights/pi_z", pair_heatmap(pi_z, self.modalities, "pi_z (coarse)"), self.global_step
        )
        if self._agreement_count > 0:
            matrix = torch.zeros(size, size)
            mean = (self._agreement_sum / self._agreement_count).cpu()
            for value, (m, k) in zip(mean, ordered_pairs(self.modalities), strict=True):
                matrix[m, k] = value
            experiment.add_figure(
                "weights/W_fine",
                pair_heatmap(matrix, self.modalities, "mean fine-grained w_ij on positives"),
                self.global_step,
            )
            self._agreement_sum.zero_()
            self._agreement_count.zero_()

    # -------------------------------------------------------------------------- checkpoints
    @classmethod
    def load_from_checkpoint(  # type: ignore[override]
        cls,
        checkpoint_path: str | Path,
        map_location: Any = None,
        hparams_file: str | Path | None = None,
        strict: bool | None = None,
        trust_checkpoint: bool = False,
        **kwargs: Any,
    ) -> MaCSC:
        """Lightning's ``load_from_checkpoint``, made safe: the file is read with
        ``weights_only=True``, so one whose unpickling would run code is refused with a
        :class:`CheckpointError` unless ``trust_checkpoint=True``; a missing, damaged or
        mismatched checkpoint is a CheckpointError too. (``macsc fit --ckpt_path`` follows the
        same rule; there ``--weights_only false`` is the trust option.)"""
        if not trust_checkpoint and _is_local(checkpoint_path):
            check_checkpoint_is_safe(checkpoint_path, how_to_trust="pass trust_checkpoint=True")
        return super().load_from_checkpoint(
            checkpoint_path,
            map_location,
            hparams_file,
            strict,
            weights_only=not trust_checkpoint,
            **kwargs,
        )

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        """``nn.Module.load_state_dict``, but a checkpoint of another architecture (another
        backbone width, other modalities or task) is a one-line :class:`CheckpointError` naming
        the mismatched keys and the checkpoint's settings, not torch's page of keys."""
        from .prototypes.checkpoints import state_dict_mismatch

        problems = state_dict_mismatch(self.state_dict(), state_dict, keys=strict)
        if problems:
            saved = {
                key: self._checkpoint_hparams[key]
                for key in ("backbone", "modalities", "task")
                if key in self._checkpoint_hparams
            }
            raise CheckpointError(
                f"the checkpoint does not fit this model (backbone {self.hparams.backbone!r}, "
                f"modalities {self.modalities}, task {self.spec.kind}): "
                + "; ".join(problems)
                + (f". It was saved with {saved}" if saved else "")
                + "; load it with the settings it was trained with"
            )
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._raise_if_nonfinite()  # never write weights that a NaN step has already corrupted

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # only when resuming a run: load_from_checkpoint has already mixed its keyword
        # overrides into these hyperparameters, and starts no training
        if self._trainer is not None:
            self._checkpoint_hparams = dict(checkpoint.get("hyper_parameters") or {})

    def configure_callbacks(self) -> list[L.Callback]:
        """The run state of an exact resume (random streams, loader position, SLURM requeue,
        atomic checkpoint files): part of every MaCSC run, with nothing to configure."""
        return [RunState()]

    # ---------------------------------------------------------------------------- optimiser
    def configure_optimizers(self) -> dict[str, Any]:
        no_decay = (
            "bias",
            "LayerNorm.weight",
            "layer_norm.weight",
            "norm.weight",
            "type_embedding",
        )
        modality_weights = ("rho_logits", "calibration.z")
        decay, plain, weights = [], [], []
        for name, parameter in self.named_parameters():
            if not parameter.requires_grad:
                continue
            if name in modality_weights:
                weights.append(parameter)
            else:
                (plain if any(key in name for key in no_decay) else decay).append(parameter)
        # the same AdamW update in one fused kernel over all parameters, where torch has one,
        # instead of the CPU default's Python loop over ~270 tensors (about 10x faster there)
        fused = all(
            p.is_floating_point() and p.device.type in ("cpu", "cuda")
            for p in decay + plain + weights
        )
        optimizer = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": self.hparams.weight_decay},
                {"params": plain, "weight_decay": 0.0},
                {
                    "params": weights,
                    "weight_decay": 0.0,
                    "lr": self.hparams.learning_rate * self.hparams.modality_weight_lr_scale,
                },
            ],
            lr=self.hparams.learning_rate,
            eps=self.hparams.adam_epsilon,
            fused=fused or None,
        )
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = int(math.ceil(self.hparams.warmup_ratio * total))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _linear_schedule(warmup, total))
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }


class _linear_schedule:
    """Linear warm-up from 0 to 1 over ``warmup`` steps, then linear decay to 0 at ``total``."""

    def __init__(self, warmup: int, total: int) -> None:
        self.warmup, self.total = warmup, total

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / (self.warmup + 1)
        return max(0.0, (self.total - step) / max(1, self.total - self.warmup))


def check_checkpoint_is_safe(path: str | Path, *, how_to_trust: str) -> None:
    """Raise :class:`CheckpointError` unless ``path`` loads with ``weights_only=True`` (so that
    unpickling it runs no code) -- before Lightning reads it, so the refusal is a clear line.
    Zip-format files are memory-mapped, so the check reads no tensor data."""
    import zipfile

    from .prototypes.checkpoints import safe_torch_load

    if not Path(path).is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    safe_torch_load(path, how_to_trust=how_to_trust, mmap=zipfile.is_zipfile(path))


def _is_local(path: Any) -> bool:
    """A local file path (not a URL, not an open file), which can be checked before loading."""
    return isinstance(path, str | Path) and "://" not in str(path)


def _metric_prefix(stage: str, name: str, names: list[str]) -> str:
    return stage if len(names) == 1 else f"{stage}_{name}"


def _build_source(name: str, spec: dict[str, Any]) -> PrototypeExtractor:
    spec = dict(spec)
    kind = spec.pop("kind", None)
    if not kind:
        raise ConfigError(
            f"model.prototypes.{name} needs a 'kind' (e.g. open_clip, audioclip, clip_vip, hf, gaussian)"
        )
    try:
        return build_extractor(kind, **spec)
    except TypeError as error:
        raise ConfigError(f"model.prototypes.{name}: {error}") from error


def _load_backbone(name: str, kwargs: dict[str, Any]) -> nn.Module:
    from transformers import AutoModel

    try:
        return AutoModel.from_pretrained(resolve_pretrained(name), **kwargs)
    except OSError as error:
        raise ConfigError(
            f"cannot load the backbone {name!r}: {str(error).splitlines()[0]} -- give a local "
            "folder (save_pretrained layout) or a hub name, and run online once (or set "
            "HF_HOME to a cache that has it) before using HF_HUB_OFFLINE=1"
        ) from error
