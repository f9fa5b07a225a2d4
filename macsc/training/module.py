"""The MaCSC LightningModule: composes the network, the task head and the objective; owns the
training, evaluation and prediction steps, the metrics, logging and the optimiser."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor

from macsc.errors import ConfigError
from macsc.method.heads import (
    EvaluationContext,
    EvaluationResult,
    HeadOutput,
    build_task_head,
    head_class,
)
from macsc.method.network import DEFAULT_PROTOTYPES, BranchRepresentations, MaCSCNetwork
from macsc.method.objective import DeviceGroup, MaCSCObjective
from macsc.method.options import EnhancerOptions, ObjectiveOptions, as_options
from macsc.paths import resolve_pretrained
from macsc.prototypes import PrototypeExtractor
from macsc.task import TaskSpec
from macsc.training.checkpoints import (
    CheckpointedModule,
    check_checkpoint_is_safe,
)
from macsc.training.compiled import CompiledAfterBackbone, check_compile_mode
from macsc.training.guards import NonFiniteCheck, NonFiniteGuard, no_gradient_loss
from macsc.training.heatmaps import ModalityWeightHeatmaps
from macsc.training.optim import OptimizerOptions, build_optimizer, linear_schedule
from macsc.training.result_files import EmptyRunCleanup, RunFolderNote, write_evaluation
from macsc.training.resume import RunState

__all__ = ["DEFAULT_PROTOTYPES", "MaCSC", "ModelOutput", "check_checkpoint_is_safe"]

#: what each evaluation stage is called in metric names and files
STAGES = {"validate": "val", "test": "test", "predict": "predict"}


@dataclass
class ModelOutput:
    """One forward pass: the network's branch representations and the head's output."""

    representations: BranchRepresentations
    head: HeadOutput

    @property
    def outputs(self) -> Tensor:
        return self.head.outputs

    @property
    def features(self) -> Tensor | None:
        return self.head.features


class MaCSC(CheckpointedModule):
    """MaCSC fine-tuning of any Hugging Face encoder (or encoder-decoder, for generation).

    Args:
        backbone: Hugging Face model name or local folder of the PLM (``bert-base-uncased``);
            null when ``text_tower`` is the encoder.
        modalities: ``[text]``, ``[text, image]``, ... ``text`` first. ``[text]`` with
            ``objective.lambda_msb: 0`` is the plain fine-tuning baseline ("+None").
        prototypes: the prototype source of each non-text modality, as keyword options of
            :func:`macsc.prototypes.build_extractor` (``{image: {kind: open_clip, ...}}``);
            modalities not listed use the paper's extractors (SPEC section 1).
        task: filled in by the data module (kind, number of labels, metrics); see
            :class:`macsc.task.TaskSpec`.
        enhancer: the semantic concept enhancement (SPEC 2), one group of options:
            :class:`macsc.method.options.EnhancerOptions`.
        objective: the loss ``L_wa + λ L_msb`` and its calibration (SPEC 4-5), one group of
            options: :class:`macsc.method.options.ObjectiveOptions`.
        optimizer: the optimiser and its learning-rate schedule, one group of options:
            :class:`macsc.training.optim.OptimizerOptions`.
        text_pooling: ``auto`` (first token, or last for XLNet), ``first``, ``last``, ``mean``.
        dropout: dropout before the heads and in the enhancer (default: the backbone's).
        nonfinite: ``raise`` stops training on a NaN/Inf loss term, naming it and the step
            (checked without a host sync in the step: at the next ``log_every_n_steps``, and
            always before a checkpoint is written); ``skip`` drops that batch on every rank (its
            gradient is zero; an update made of skipped batches only is not applied) and logs
            ``train/skipped_batches`` (one host sync per step).
        backbone_kwargs: extra keyword arguments of ``from_pretrained``.
        head_options: options of the task kind's head (generation: ``num_beams``,
            ``max_new_tokens``, ``decoder_memory``, ...; see the head classes in
            :mod:`macsc.method.heads`). A checkpoint records the options its head ran with
            (:meth:`macsc.method.heads.TaskHead.recorded_options`).
        text_tower: the MC-PTM baselines (SPEC 13; Table 4 "+None" of CLIP, AudioCLIP,
            CLIP-ViP): a multimodal model's text tower is the encoder and is fine-tuned, and the
            data is tokenised with its own tokenizer; ``{kind: open_clip|audioclip|clip_vip,
            <the options that load it, as in prototypes>, projection: true}``
            (:mod:`macsc.method.text_tower`). Needs ``backbone: null``.
        compile_after_backbone: a ``torch.compile`` mode for what a training step runs after
            the backbone (enhancers, heads, objective); ``reduce-overhead`` captures it in CUDA
            graphs, one per text length the batches have (:mod:`macsc.training.compiled`).
            Null (the default): eager.

    The option groups may also be given as mappings (``objective={"tau": 0.2}``); the
    hyperparameters a checkpoint keeps hold them as mappings.
    """

    def __init__(
        self,
        backbone: str | None = "bert-base-uncased",
        modalities: list[str] | None = None,
        prototypes: dict[str, dict[str, Any]] | None = None,
        task: dict[str, Any] | None = None,
        enhancer: EnhancerOptions = EnhancerOptions(),
        objective: ObjectiveOptions = ObjectiveOptions(),
        optimizer: OptimizerOptions = OptimizerOptions(),
        text_pooling: str = "auto",
        dropout: float | None = None,
        nonfinite: str = "raise",
        backbone_kwargs: dict[str, Any] | None = None,
        head_options: dict[str, Any] | None = None,
        text_tower: dict[str, Any] | None = None,
        compile_after_backbone: str | None = None,
    ) -> None:
        super().__init__()
        modalities = (
            list(modalities) if modalities is not None else ["text", "image", "audio", "video"]
        )
        enhancer = as_options(EnhancerOptions, enhancer, "model.enhancer")
        objective = as_options(ObjectiveOptions, objective, "model.objective")
        self.optimizer_options = as_options(OptimizerOptions, optimizer, "model.optimizer")
        self.guard = NonFiniteGuard(nonfinite)
        self.save_options(enhancer=enhancer, objective=objective, optimizer=self.optimizer_options)
        self.modalities = modalities
        self.spec = TaskSpec.from_dict(task)
        self.network = MaCSCNetwork(
            backbone,
            modalities,
            prototypes,
            auto_class=head_class(self.spec.kind).auto_class,
            enhancer=enhancer,
            text_pooling=text_pooling,
            dropout=dropout,
            backbone_kwargs=backbone_kwargs,
            text_tower=text_tower,
        )
        self.head = build_task_head(
            self.spec,
            len(modalities),
            self.network.hidden_size,
            dropout=self.network.dropout_rate,
            **(head_options or {}),
        )
        self.head.attach(self.network.backbone)
        self.objective = MaCSCObjective(modalities, self.network.hidden_size, self.head, objective)
        check_compile_mode(compile_after_backbone, objective.gather_across_devices)
        self.compiled_after_backbone = (
            CompiledAfterBackbone(self.after_backbone, compile_after_backbone)
            if compile_after_backbone
            else None
        )
        self._updated: set[str] = set()
        self.metrics = torch.nn.ModuleDict(
            {
                f"{stage}_{name}": self.head.make_metrics(["fused", *modalities])
                for stage in STAGES.values()
                for name in self.spec.val_names
            }
        )

    # ----------------------------------------------------------------- what the data needs
    @property
    def backbone_name(self) -> str:
        """Where the backbone (and so its tokenizer) was loaded from."""
        if self.network.is_text_tower:
            raise ConfigError(
                f"this model's encoder is the text tower {self.network.backbone.description} "
                "(model.text_tower), not a Hugging Face backbone"
            )
        return resolve_pretrained(self.hparams.backbone)

    @property
    def tokenizer(self) -> Any:
        """What tokenises the text for this model, as :meth:`tasks.base.MaCSCDataModule.connect`
        takes it: the backbone's name or folder (the data module loads its tokenizer), or a text
        tower's own tokenizer object."""
        tokenizer = self.network.tokenizer
        return self.backbone_name if tokenizer is None else tokenizer

    @property
    def extractors(self) -> dict[str, PrototypeExtractor]:
        """The prototype source of every non-text modality, in ``modalities`` order."""
        return self.network.extractors

    def setup(self, stage: str) -> None:
        if self.network.sources:
            # a modality missing from model.prototypes silently takes the paper's extractor
            # (a dict given on the command line replaces the whole dict): say which is used
            rank_zero_info("prototype sources: " + "; ".join(self.network.sources.values()))
        datamodule = (
            getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        )
        if stage != "fit":
            return
        if datamodule is not None and hasattr(datamodule, "train_label_classes"):
            self.objective.set_class_prior(self.head, datamodule.train_label_classes())
        elif self.objective.calibration is not None and self.objective.alpha != 0:
            rank_zero_warn(
                "the class prior pi_e of Eq. 4 stays uniform: training runs without a data "
                "module that gives the training labels (train_label_classes()), so the "
                "debiasing does nothing; use a macsc data module (tasks.*), or give yours a "
                "train_label_classes() method, or set model.objective.alpha: 0 to say so"
            )

    def configure_callbacks(self) -> list[L.Callback]:
        """What every run needs, so a user never has to configure it: the non-finite check,
        the modality-weight heatmaps, and the run state of an exact resume (random streams,
        loader position, SLURM requeue, atomic checkpoint files), the removal of the empty
        folder a failed evaluation would leave, and saying where the run is."""
        callbacks = [NonFiniteCheck(), ModalityWeightHeatmaps(), RunState(), EmptyRunCleanup()]
        return [*callbacks, RunFolderNote()]

    # ----------------------------------------------------------------------------- forward
    def forward(self, batch: dict) -> ModelOutput:
        return self.branches(self.network.encode(batch), batch)

    def branches(self, text: Tensor, batch: dict) -> ModelOutput:
        """What runs after the backbone: the enhancers and the heads, from ``H^t`` ``(B, l, d)``."""
        # a head that reads one row of each Ĥ^t_m: the enhancers then compute only that row
        rows = (
            None if self.head.needs_tokens else self.network.sentence_rows(batch["attention_mask"])
        )
        representations = self.network.enhance(text, batch, rows)
        return ModelOutput(representations, self.head(representations, batch))

    def after_backbone(self, text: Tensor, batch: dict) -> dict[str, Any]:
        """Every loss term of the batch from the backbone's output ``H^t`` ``(B, l, d)``, on one
        device (no gathering across ranks): the part of a training step whose shapes are fixed
        once the text length is, which ``compile_after_backbone`` compiles."""
        return self.objective(self.head, self.branches(text, batch).head, batch)

    def compute_losses(self, batch: dict, forward: ModelOutput) -> dict[str, Any]:
        """Every loss term of the batch (:meth:`macsc.method.objective.MaCSCObjective.forward`)."""
        devices = None
        attached = self._trainer is not None or self._fabric is not None
        if attached and self.trainer.world_size > 1:
            devices = DeviceGroup(
                self.all_gather, self.trainer.world_size, self.trainer.global_rank
            )
        return self.objective(self.head, forward.head, batch, devices)

    def training_losses(self, batch: dict) -> dict[str, Any]:
        """The loss terms of a training batch: eager, or what runs after the backbone compiled
        (``compile_after_backbone``)."""
        if self.compiled_after_backbone is None:
            return self.compute_losses(batch, self(batch))
        return self.compiled_after_backbone(self.network.encode(batch), batch)

    # ---------------------------------------------------------------------------- training
    def training_step(self, batch: dict, batch_idx: int) -> dict[str, Any]:
        losses = self.training_losses(batch)
        terms = self.objective.terms(losses)
        if self.guard.policy == "skip":
            any_rank = None
            if self.trainer.world_size > 1:
                any_rank = lambda bad: self.trainer.strategy.reduce(bad, reduce_op="sum")  # noqa: E731
            if self.guard.should_skip(terms, self.objective.term_names, self.global_step, any_rank):
                self.log("train/skipped_batches", self.guard.skipped_batches.float(), on_step=True)
                return {"loss": no_gradient_loss(self)}
        else:
            self.guard.note(terms, self.global_step)
        self._log_training(losses, batch["input_ids"].shape[0])
        step = {"loss": losses["total"]}
        if "agreement" in losses:
            step["agreement"] = losses["agreement"].detach()
        return step

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        self.guard.before_optimizer_step(optimizer)

    def _log_training(self, losses: dict[str, Any], batch_size: int) -> None:
        log = dict(on_step=True, on_epoch=False, batch_size=batch_size)
        self.log("loss/total", losses["total"], prog_bar=True, **log)
        if not self._logger_writes_this_step():
            return
        values = {"loss/wa": losses["wa"]}
        if self.objective.rho_logits is not None:
            rho = torch.softmax(self.objective.rho_logits.detach(), 0)
            values.update({f"weights/rho/{m}": rho[i] for i, m in enumerate(self.modalities)})
        if "msb" in losses:
            values["loss/msb"] = losses["msb"]
            index = {m: i for i, m in enumerate(self.modalities)}
            pairs = self.objective.calibration.pair_names
            for (m, k), pair_loss in zip(pairs, losses["pairs"], strict=True):
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

    # --------------------------------------------------------------------------- evaluation
    def _evaluate(self, stage: str, batch: dict, dataloader_idx: int) -> None:
        forward = self(batch)
        key = f"{stage}_{self.spec.val_names[dataloader_idx]}"
        scored = stage != "predict" and self.head.has_targets(batch)
        if stage != "predict" and not scored:
            return  # an unlabelled evaluation split (GLUE test) is not scored
        self._updated.add(key)
        self.head.update_metrics(
            self.metrics[key],
            forward.head,
            forward.representations,
            self.objective.rho_logits,
            batch,
        )
        loss = (
            self.head.evaluation_loss(forward.outputs, self.objective.rho_logits, batch)
            if scored
            else None
        )
        if loss is not None:
            self.log(
                f"{self._metric_prefix(stage, dataloader_idx)}/loss",
                loss,
                on_epoch=True,
                batch_size=batch["input_ids"].shape[0],
                add_dataloader_idx=False,
            )

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluate("val", batch, dataloader_idx)

    def test_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluate("test", batch, dataloader_idx)

    def predict_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        """Predictions are gathered like evaluation results and written at the end of the
        epoch as ``predictions-<split>.jsonl`` (and the task's official files)."""
        self._evaluate("predict", batch, dataloader_idx)

    def on_validation_epoch_end(self) -> None:
        self._finish("val")

    def on_test_epoch_end(self) -> None:
        self._finish("test")

    def on_predict_epoch_end(self) -> None:
        self._finish("predict")

    def _metric_prefix(self, stage: str, index: int) -> str:
        names = self.spec.val_names
        return stage if len(names) == 1 else f"{stage}_{names[index]}"

    def _finish(self, stage: str) -> None:
        """Compute each split's metrics, log them, and write its files."""
        for index, name in enumerate(self.spec.val_names):
            key = f"{stage}_{name}"
            if key not in self._updated:
                continue
            self._updated.discard(key)
            datamodule = getattr(self.trainer, "datamodule", None)
            context = EvaluationContext(
                stage,
                name,
                datamodule,
                sanity_check=self.trainer.sanity_checking,
                is_global_zero=self.trainer.is_global_zero,
                broadcast=self.trainer.strategy.broadcast,
            )
            result = self.head.compute_metrics(self.metrics[key], context)
            prefix = self._metric_prefix(stage, index)
            if stage != "predict":
                self.log_dict(
                    {f"{prefix}/{k}": v for k, v in result.metrics.items() if "/" in k},
                )
                self.log_dict(
                    {f"{prefix}/{k}": v for k, v in result.metrics.items() if "/" not in k},
                    prog_bar=True,
                )
            self._write(stage, name, result, datamodule)
            experiment = getattr(self.logger, "experiment", None)
            if result.samples and self.trainer.is_global_zero and hasattr(experiment, "add_text"):
                text = "\n\n".join(f"{i + 1}. {sample}" for i, sample in enumerate(result.samples))
                experiment.add_text(f"{prefix}/samples", text, self.global_step)

    def _write(self, stage: str, name: str, result: EvaluationResult, datamodule: Any) -> None:
        """The split's result files in the logger's folder (:func:`write_evaluation`): on
        global rank 0, not during the sanity check, and only when the run has a logger."""
        trainer = self.trainer
        if not trainer.loggers:
            return
        log_dir = Path(trainer.log_dir)  # a broadcast under DDP: every rank must ask
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        summary = {
            "stage": trainer.state.fn.value if trainer.state.fn else stage,
            "split": _split_name(datamodule, stage, name),
            "task": getattr(datamodule, "task", None) or type(datamodule).__name__,
            "global_step": trainer.global_step,
            "epoch": trainer.current_epoch,
        }
        write_evaluation(log_dir, stage, name, summary, result)

    # ---------------------------------------------------------------------------- optimiser
    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = build_optimizer(self, self.optimizer_options)
        schedule = linear_schedule(
            optimizer, self.trainer.estimated_stepping_batches, self.optimizer_options
        )
        return {"optimizer": optimizer, "lr_scheduler": schedule}


def _split_name(datamodule: Any, stage: str, name: str) -> str:
    """The data module's name of the split evaluated as ``name`` (``validation_matched``)."""
    resolve = getattr(datamodule, "evaluated_split_name", None)
    return resolve(stage, name) if resolve is not None else name
