"""Generation (CommonGen with T5; SPEC 6): the decoder reads T5's own encoder output followed by
the enhanced prototypes (checked against T5 run on a memory built by hand), beam search is
Hugging Face's with the configured beams, text only is plain T5, checkpoints keep the memory
they were trained with, and fit then test through the CLI writes the predictions and the
metrics."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, T5ForConditionalGeneration
from transformers.modeling_outputs import BaseModelOutput

from macsc.cli import main
from macsc.errors import CheckpointError, ConfigError
from macsc.training.module import MaCSC

ROOT = Path(__file__).resolve().parents[2]
TASK = {"kind": "generation", "num_labels": 1, "metrics": ["bleu_4"]}
PROTOTYPES = {
    "image": {"kind": "gaussian", "dim": 16, "k": 4},
    "audio": {"kind": "gaussian", "dim": 24, "k": 4, "seed": 1},
}
CONCEPTS = ["dog frisbee catch", "cat sofa sleep"]
TARGETS = ["a dog catches a frisbee", "the cat sleeps on the sofa"]


HEAD_OPTIONS = {"num_beams": 2, "max_new_tokens": 6}


def model(backbone: str, modalities=("text", "image", "audio"), head_options=None, **options):
    torch.manual_seed(0)
    return MaCSC(
        backbone=backbone,
        modalities=list(modalities),
        prototypes=PROTOTYPES,
        task=TASK,
        enhancer={"heads": 4},
        head_options=HEAD_OPTIONS | (head_options or {}),
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


def masked_batch(net: MaCSC, backbone: str) -> dict:
    """:func:`batch_of` with a padded text (CONCEPTS differ in length) and a different pattern of
    masked prototypes per modality, so that every part of the decoder's mask matters."""
    batch = batch_of(net, backbone)
    assert not batch["attention_mask"].bool().all()
    patterns = {"image": [[1, 0, 1, 1], [1, 1, 0, 0]], "audio": [[1, 1, 1, 0], [0, 1, 1, 1]]}
    for name, pattern in patterns.items():
        batch["prototypes"][name]["mask"] = torch.tensor(pattern, dtype=torch.bool)
    return batch


def memory_by_hand(net: MaCSC, t5, batch: dict, text: str = "encoder_output"):
    """The decoder memory and mask written out from the paper's sentence: T5's own encoder output
    (run here by the reference T5), then each modality's prototypes as its enhancer makes them
    from that output, in ``modalities`` order; ``enhanced_text``: the mean of the enhancers'
    text rows in place of the encoder output."""
    encoded = t5.encoder(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
    ).last_hidden_state
    sources = [batch["prototypes"][name] for name in ("image", "audio")]
    rows, prototypes, _ = net.network.enhancers(
        encoded,
        batch["attention_mask"],
        [source["features"] for source in sources],
        [source["mask"] for source in sources],
    )  # each modality's enhancer, one slice each
    masks = [batch["attention_mask"], *(source["mask"].long() for source in sources)]
    first = encoded if text == "encoder_output" else (rows[0] + rows[1]) / 2
    return encoded, torch.cat([first, *prototypes], dim=1), torch.cat(masks, dim=1)


def reference_t5(backbone: str) -> T5ForConditionalGeneration:
    return T5ForConditionalGeneration.from_pretrained(backbone).eval()


def test_the_memory_is_t5s_encoder_output_then_each_modalitys_prototypes(tiny_t5):
    net = model(tiny_t5)
    batch = masked_batch(net, tiny_t5)
    with torch.no_grad():
        encoded, expected, expected_mask = memory_by_hand(net, reference_t5(tiny_t5), batch)
        memory, mask = net.head.memory(net.network(batch))
    length = batch["input_ids"].shape[1]
    assert torch.equal(memory[:, :length], encoded)  # T5's encoder output, unchanged
    torch.testing.assert_close(memory, expected)  # then Ĥ^image (4 rows), then Ĥ^audio (4)
    assert memory.shape[1] == length + 4 + 4
    assert torch.equal(mask, expected_mask)


def test_teacher_forced_logits_are_t5s_decoder_on_the_memory_built_by_hand(tiny_t5):
    net = model(tiny_t5)
    batch = masked_batch(net, tiny_t5)
    t5 = reference_t5(tiny_t5)
    with torch.no_grad():
        _, memory, mask = memory_by_hand(net, t5, batch)
        expected = t5(
            encoder_outputs=BaseModelOutput(last_hidden_state=memory),
            attention_mask=mask,
            labels=batch["labels"],
        )
        ours = net(batch)
        loss = net.compute_losses(batch, ours)["total"]
    torch.testing.assert_close(ours.outputs, expected.logits)
    torch.testing.assert_close(loss, expected.loss)


def test_beam_search_is_hugging_faces_with_the_configured_beams(tiny_t5):
    net = model(tiny_t5)  # num_beams 2
    batch = masked_batch(net, tiny_t5)
    t5 = reference_t5(tiny_t5)
    with torch.no_grad():
        _, memory, mask = memory_by_hand(net, t5, batch)
        beams, greedy = (
            t5.generate(
                # a new BaseModelOutput per call: beam search expands the one it gets in place
                encoder_outputs=BaseModelOutput(last_hidden_state=memory),
                attention_mask=mask,
                num_beams=k,
                max_new_tokens=6,
            )
            for k in (2, 1)
        )
        tokens = net.head.generate(net.network(batch))
    assert not torch.equal(beams, greedy)  # so a head that decoded greedily would be seen
    assert torch.equal(tokens, beams)


def test_enhanced_text_memory_is_the_named_departure(tiny_t5):
    net = model(tiny_t5, head_options={"decoder_memory": "enhanced_text"})
    batch = masked_batch(net, tiny_t5)
    t5 = reference_t5(tiny_t5)
    with torch.no_grad():
        _, expected, expected_mask = memory_by_hand(net, t5, batch, text="enhanced_text")
        memory, mask = net.head.memory(net.network(batch))
        logits = t5(
            encoder_outputs=BaseModelOutput(last_hidden_state=expected),
            attention_mask=expected_mask,
            labels=batch["labels"],
        ).logits
        ours = net(batch).outputs
    torch.testing.assert_close(memory, expected)
    assert torch.equal(mask, expected_mask)
    torch.testing.assert_close(ours, logits)


def test_an_unknown_decoder_memory_is_refused_naming_the_option(tiny_t5):
    with pytest.raises(ConfigError, match=r"model\.head_options\.decoder_memory .*'text_branch'"):
        model(tiny_t5, head_options={"decoder_memory": "text_branch"})


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
    projection = net.network.enhancers.project
    for index in range(2):  # each modality's own block of the projection
        assert projection.weight.grad[:, projection.block(index)].abs().sum() > 0
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
    weight = "network.enhancers.project.weight"
    grads = {name: p.grad for name, p in net.named_parameters() if p.grad is not None}
    expected = dict(plain.named_parameters())[weight].grad
    torch.testing.assert_close(grads[weight], expected)


def test_generation_has_no_self_balancing_loss(tiny_t5):
    assert model(tiny_t5).hparams.objective["lambda_msb"] is None  # the kind's default: 0
    with pytest.raises(ConfigError, match="no self-balancing loss"):
        model(tiny_t5, objective={"lambda_msb": 0.2})


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
        "--model.enhancer.heads=4",
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


def trained_checkpoint(backbone: str, folder: Path) -> tuple[Path, dict]:
    """A checkpoint written by Lightning after one training step, and the batch."""
    import lightning as L
    from torch.utils.data import DataLoader

    net = model(backbone).train()
    batch = masked_batch(net, backbone)
    trainer = L.Trainer(
        max_steps=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=folder,
    )
    trainer.fit(net, train_dataloaders=DataLoader([batch], batch_size=None))
    path = folder / "trained.ckpt"
    trainer.save_checkpoint(path)
    return path, batch


def logits_of(net: MaCSC, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        return net.eval()(batch).outputs


def test_checkpoints_load_with_the_memory_they_were_trained_with(tiny_t5, tmp_path):
    """The form is recorded in the checkpoint; one written before the option existed was
    trained on ``enhanced_text`` and keeps it, though the default is now the paper's."""
    path, batch = trained_checkpoint(tiny_t5, tmp_path)
    state = torch.load(path, weights_only=True)
    assert state["macsc_head_options"] == {"decoder_memory": "encoder_output"}
    paper, departure = (
        model(tiny_t5, head_options={"decoder_memory": form})
        for form in ("encoder_output", "enhanced_text")
    )
    for net in (paper, departure):
        net.load_state_dict(state["state_dict"])
    assert not torch.allclose(logits_of(paper, batch), logits_of(departure, batch))
    loaded = MaCSC.load_from_checkpoint(path, head_options={"num_beams": 3})
    torch.testing.assert_close(logits_of(loaded, batch), logits_of(paper, batch))

    # the same checkpoint as macsc wrote it before the option: no record of the form
    del state["macsc_head_options"]
    torch.save(state, tmp_path / "old.ckpt")
    for options in ({}, {"num_beams": 3}):  # keyword overrides of other options change nothing
        restored = MaCSC.load_from_checkpoint(tmp_path / "old.ckpt", head_options=options)
        torch.testing.assert_close(logits_of(restored, batch), logits_of(departure, batch))
    # a form named explicitly that differs from the trained one is refused, in one line
    with pytest.raises(CheckpointError, match=r"decoder_memory is 'encoder_output'.*predates"):
        MaCSC.load_from_checkpoint(
            tmp_path / "old.ckpt", head_options={"decoder_memory": "encoder_output"}
        )
