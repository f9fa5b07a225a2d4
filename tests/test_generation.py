"""Generation (CommonGen with T5; SPEC 6): the decoder reads the enhanced prototypes, text only
is plain T5, beam search gives sentences, and fit then test through the CLI writes the
predictions and the metrics."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, T5ForConditionalGeneration

from macsc.cli import main
from macsc.errors import ConfigError
from macsc.model import MaCSC

ROOT = Path(__file__).resolve().parents[1]
TASK = {"kind": "generation", "num_labels": 1, "metrics": ["bleu_4"]}
PROTOTYPES = {
    "image": {"kind": "gaussian", "dim": 16, "k": 4},
    "audio": {"kind": "gaussian", "dim": 24, "k": 4, "seed": 1},
}
CONCEPTS = ["dog frisbee catch", "cat sofa sleep"]
TARGETS = ["a dog catches a frisbee", "the cat sleeps on the sofa"]


def model(backbone: str, modalities=("text", "image", "audio"), **options) -> MaCSC:
    torch.manual_seed(0)
    return MaCSC(
        backbone=backbone,
        modalities=list(modalities),
        prototypes=PROTOTYPES,
        task=TASK,
        enhancer_heads=4,
        head_options={"num_beams": 2, "max_new_tokens": 6},
        **options,
    ).eval()


def batch_of(net: MaCSC, backbone: str) -> dict:
    tokenizer = AutoTokenizer.from_pretrained(backbone)
    batch = dict(tokenizer(CONCEPTS, padding=True, return_tensors="pt"))
    batch.pop("token_type_ids")
    labels = tokenizer(text_target=TARGETS, padding=True, return_tensors="pt")["input_ids"]
    batch["labels"] = labels.masked_fill(labels == tokenizer.pad_token_id, -100)
    batch["prototypes"] = {}
    for name, extractor in net.extractors.items():
        out = extractor.extract(CONCEPTS)
        batch["prototypes"][name] = {"features": out.features, "mask": out.mask}
    return batch


def test_the_decoder_reads_every_modalitys_prototypes(tiny_t5):
    net = model(tiny_t5)
    batch = batch_of(net, tiny_t5)
    with torch.no_grad():
        loss = net.compute_losses(batch, net(batch))["total"]
        logits = net(batch).outputs
        for name in ("image", "audio"):
            changed = {**batch, "prototypes": dict(batch["prototypes"])}
            changed["prototypes"][name] = {
                "features": batch["prototypes"][name]["features"] + 1.0,
                "mask": batch["prototypes"][name]["mask"],
            }
            assert not torch.allclose(net(changed).outputs, logits), name
            assert net.compute_losses(changed, net(changed))["total"] != loss, name
            # masking the modality's prototypes out of the decoder memory changes it too
            hidden = {**changed, "prototypes": dict(changed["prototypes"])}
            hidden["prototypes"][name] = {
                "features": changed["prototypes"][name]["features"],
                "mask": torch.zeros_like(changed["prototypes"][name]["mask"]),
            }
            assert not torch.allclose(net(hidden).outputs, net(changed).outputs), name


def test_text_only_is_plain_t5_fine_tuning(tiny_t5):
    net = model(tiny_t5, modalities=["text"])
    assert net.objective.rho_logits is None and net.objective.calibration is None
    batch = batch_of(net, tiny_t5)
    reference = T5ForConditionalGeneration.from_pretrained(tiny_t5).eval()
    with torch.no_grad():
        expected = reference(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            labels=batch["labels"],
        )
        ours = net(batch)
        losses = net.compute_losses(batch, ours)
    torch.testing.assert_close(ours.outputs, expected.logits)
    torch.testing.assert_close(losses["total"], expected.loss)


def test_gradients_reach_the_enhancers_and_beam_search_gives_sentences(tiny_t5):
    net = model(tiny_t5).train()
    batch = batch_of(net, tiny_t5)
    net.compute_losses(batch, net(batch))["total"].backward()
    for name in ("image", "audio"):
        assert net.network.enhancers[name].project.weight.grad.abs().sum() > 0
    net.eval()
    with torch.no_grad():
        tokens = net.head.generate(net.network(batch))
    assert tokens.shape[0] == 2 and tokens.shape[1] <= 1 + 6
    sentences = AutoTokenizer.from_pretrained(tiny_t5).batch_decode(
        tokens, skip_special_tokens=True
    )
    assert all(isinstance(s, str) for s in sentences)


def test_checkpointed_blocks_recompute_the_same_graph(tiny_t5):
    """FSDP's activation checkpointing recomputes each T5 block in the backward pass; the
    training forward must not fill a key/value cache that the recomputation would then reuse
    (it failed on an H200 with "a different number of tensors was saved")."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        apply_activation_checkpointing,
    )
    from transformers.models.t5.modeling_t5 import T5Block

    net, plain = model(tiny_t5).train(), model(tiny_t5).train()
    apply_activation_checkpointing(net, check_fn=lambda module: isinstance(module, T5Block))
    batch = batch_of(net, tiny_t5)
    for m in (net, plain):
        torch.manual_seed(1)
        m.compute_losses(batch, m(batch))["total"].backward()
    weight = "network.enhancers.image.project.weight"
    grads = {name: p.grad for name, p in net.named_parameters() if p.grad is not None}
    expected = dict(plain.named_parameters())[weight].grad
    torch.testing.assert_close(grads[weight], expected)


def test_generation_has_no_self_balancing_loss(tiny_t5):
    assert model(tiny_t5).hparams.lambda_msb is None  # the kind's default: 0 for generation
    with pytest.raises(ConfigError, match="no self-balancing loss"):
        model(tiny_t5, lambda_msb=0.2)


def write_split(path: Path, rows: list[tuple[list[str], str]]) -> str:
    path.write_text("".join(json.dumps({"concepts": c, "target": t}) + "\n" for c, t in rows))
    return str(path)


def test_fit_then_test_through_the_cli_writes_predictions_and_metrics(tiny_t5, tmp_path):
    rows = [
        (["dog", "frisbee", "catch"], "a dog catches a frisbee"),
        (["dog", "frisbee", "catch"], "the dog jumps to catch the frisbee"),
        (["cat", "sofa", "sleep"], "the cat sleeps on the sofa"),
        (["kid", "ball", "kick"], "kids kick a ball"),
    ]
    train = write_split(tmp_path / "train.jsonl", rows * 4)
    validation = write_split(tmp_path / "dev.jsonl", rows)
    common = [
        "--config",
        str(ROOT / "lightning_configs" / "commongen.yaml"),
        "--config",
        str(ROOT / "lightning_configs" / "cpu.yaml"),
        f"--model.backbone={tiny_t5}",
        f"--model.prototypes={json.dumps(PROTOTYPES | {'video': {'kind': 'gaussian', 'dim': 16, 'k': 4, 'seed': 2}})}",
        "--model.enhancer_heads=4",
        '--model.head_options={"num_beams": 2, "max_new_tokens": 6}',
        f"--data.init_args.data_files={json.dumps({'train': train, 'validation': validation})}",
        f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}",
        "--trainer.max_steps=2",
    ]
    assert main(["fit", *common]) == 0
    (best,) = (tmp_path / "runs").rglob("best.ckpt")
    assert main(["test", *common, f"--ckpt_path={best}"]) == 0
    test_run = max((tmp_path / "runs" / "commongen").glob("version_*"))
    records = [
        json.loads(line)
        for line in (test_run / "predictions-validation.jsonl").read_text().splitlines()
    ]
    assert [r["concepts"] for r in records] == [r[0] for r in rows if r[1] != rows[1][1]]
    assert records[0]["gold"] == [rows[0][1], rows[1][1]]  # the set's references, grouped
    assert all(isinstance(r["prediction"], str) and r["correct"] is None for r in records)
    summary = json.loads((test_run / "metrics-validation.json").read_text())
    assert summary["stage"] == "test" and summary["task"] == "commongen"
    assert {"bleu_4", "meteor", "rouge_l", "cider", "coverage"} <= set(summary["metrics"])
    assert all(0.0 <= summary["metrics"][m] <= 1.0 for m in ("bleu_4", "coverage"))
