"""MC-PTM baselines (SPEC 13): a CLIP-family text tower as the encoder, through the CLI on the
demo data with a tiny open_clip model; its tokenizer is the tower's, its sentence feature is
CLIP's own ``encode_text``, gradients reach it, and SQuAD windows fit its 77-token context.
The AudioCLIP and CLIP-ViP towers are checked against the independent reference forwards of
``test_prototypes_clip``."""

import json
from pathlib import Path

import pytest
import torch

from macsc.cli import main
from macsc.cli.lightning import run_lightning
from macsc.errors import ConfigError
from macsc.method.network import MaCSCNetwork
from macsc.method.text_tower import build_text_tower
from macsc.squad.features import prepare_squad_features
from macsc.squad.postprocess import postprocess_qa_predictions
from macsc.training.module import MaCSC
from tasks.squad import SquadDataModule

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "lightning_configs"
TINY = "macsc-test-tiny-tower"
SENTENCES = ["a dog barks at the mailman.", "It's 1999, what's up?", "rain"]


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A tiny open_clip architecture (registered as open_clip's JSON configs are), its whole
    model, and a checkpoint file of it (image tower included): CLIP's real 77-token context and
    49408-token BPE vocabulary, width 64."""
    import open_clip
    from open_clip.factory import _MODEL_CONFIGS

    _MODEL_CONFIGS[TINY] = {
        "embed_dim": 32,
        "quick_gelu": True,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 16},
        "text_cfg": {
            "context_length": 77,
            "vocab_size": 49408,
            "width": 64,
            "heads": 2,
            "layers": 2,
        },
    }
    torch.manual_seed(0)
    model = open_clip.create_model(TINY).eval()
    path = tmp_path_factory.mktemp("tiny_clip") / "tiny.pt"
    torch.save(model.state_dict(), path)
    return model, path


def tower_options(path: Path) -> dict:
    return {"kind": "open_clip", "model_name": TINY, "pretrained": None, "checkpoint": str(path)}


def clip_ids(texts: list[str]) -> list[list[int]]:
    """open_clip's own tokenisation, padding cut off."""
    import open_clip

    tokens = open_clip.tokenize(texts)
    return [row[: int(row.argmax()) + 1].tolist() for row in tokens]


def demo_args(tiny_clip_path: Path, root: Path, *extra: str) -> list[str]:
    return [
        "--config",
        str(CONFIGS / "demo.yaml"),
        "--config",
        str(CONFIGS / "tables" / "clip_text.yaml"),
        "--model.text_tower",
        json.dumps(tower_options(tiny_clip_path)),
        "--trainer.logger.init_args.save_dir",
        str(root),
        "--trainer.max_steps",
        "3",
        "--trainer.limit_val_batches",
        "1",
        "--trainer.val_check_interval",
        "3",
        "--trainer.enable_progress_bar",
        "false",
        "--data.init_args.batch_size",
        "8",
        *extra,
    ]


def test_the_tower_trains_through_the_cli_on_its_own_tokens(tiny_clip, tmp_path):
    clip, path = tiny_clip
    cli = run_lightning(demo_args(path, tmp_path), run=False)
    model, data = cli.model, cli.datamodule
    # the data module tokenises with the tower's BPE: open_clip's ids, SOT ... EOT
    assert data.tokenizer is model.tokenizer
    assert model.network.hidden_size == 32  # the text projection's width
    encoded = data.tokenizer(SENTENCES)["input_ids"]
    assert encoded == clip_ids(SENTENCES)
    batch = next(iter(data.train_dataloader()))
    texts = batch["segments"][0]
    for ids, mask, text in zip(batch["input_ids"], batch["attention_mask"], texts, strict=True):
        assert ids[: int(mask.sum())].tolist() == clip_ids([text])[0]
    # the sentence position is the EOT (open_clip's argmax id)
    rows = model.network.sentence_rows(batch["attention_mask"])[:, 0]
    assert rows.tolist() == [len(ids) - 1 for ids in clip_ids(texts)]

    # every tensor of the tower gets a gradient from the task loss
    model.train()
    model.compute_losses(batch, model(batch))["total"].backward()
    tower = model.network.backbone.tower
    for name, parameter in tower.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    model.zero_grad()
    before = {k: v.clone() for k, v in tower.state_dict().items()}

    cli.trainer.fit(model, datamodule=data)
    after = tower.state_dict()
    moved = [k for k in before if not torch.equal(before[k], after[k])]
    assert "text.token_embedding.weight" in moved and "text.text_projection" in moved
    # norms are not decayed, as for the PLM rows
    groups = cli.trainer.optimizers[0].param_groups
    plain = {id(p) for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    assert id(tower.text.ln_final.weight) in plain
    assert id(tower.text.token_embedding.weight) not in plain

    # the checkpoint reloads: the tower is rebuilt from its file, then gets its trained weights
    checkpoint = next(tmp_path.rglob("last.ckpt"))
    reloaded = MaCSC.load_from_checkpoint(checkpoint)
    assert reloaded.hparams.backbone is None and reloaded.network.is_text_tower
    for key, value in reloaded.network.backbone.tower.state_dict().items():
        assert torch.equal(value, after[key]), key


def test_the_sentence_feature_is_clips_encode_text(tiny_clip):
    clip, path = tiny_clip
    import open_clip

    network = MaCSCNetwork(None, ["text"], text_tower=tower_options(path)).eval()
    encoded = network.tokenizer(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        representations = network(dict(encoded))
        expected = clip.encode_text(open_clip.tokenize(SENTENCES))
    sentence = representations.sentence(representations.text)
    torch.testing.assert_close(sentence, expected, atol=1e-5, rtol=1e-5)
    # without the projection H^t is the transformer's width, and the projection stays out
    plain = MaCSCNetwork(None, ["text"], text_tower={**tower_options(path), "projection": False})
    assert plain.hidden_size == 64
    trained = {n for n, p in plain.backbone.named_parameters() if p.requires_grad}
    assert "tower.text.ln_final.weight" in trained and "tower.text.text_projection" not in trained
    # pairs: SOT a EOT EOT b EOT, read at the final EOT, which alone sees both texts
    pair = network.tokenizer(["a dog"], ["barks"])["input_ids"][0]
    assert pair == [49406, *clip_ids(["a dog"])[0][1:], 49407, *clip_ids(["barks"])[0][1:]]


def test_the_other_towers_give_their_reference_states(tmp_path):
    from tests.prototypes.test_clip import (
        audioclip_state,
        clip_vip_state,
        reference_clip_forward,
        reference_clip_vip,
        tokenize,
    )

    tokens = tokenize(SENTENCES)
    eot = tokens.argmax(dim=1)
    for kind, state, reference in (
        ("audioclip", audioclip_state(), lambda s: reference_clip_forward(s, tokens)[0]),
        ("clip_vip", clip_vip_state(), lambda s: reference_clip_vip(s, tokens)[0]),
    ):
        path = tmp_path / f"{kind}.pt"
        torch.save(state, path)
        network = MaCSCNetwork(
            None, ["text"], text_tower={"kind": kind, "checkpoint": str(path)}
        ).eval()
        encoded = network.tokenizer(SENTENCES, padding=True, return_tensors="pt")
        with torch.no_grad():
            text = network(dict(encoded)).text
        projected = reference(state)
        for row, end in enumerate(eot.tolist()):
            torch.testing.assert_close(
                text[row, : end + 1], projected[row, : end + 1], atol=1e-4, rtol=1e-4
            )


def test_squad_windows_fit_the_77_token_context(tiny_clip):
    tokenizer = build_text_tower(tower_options(tiny_clip[1])).tokenizer
    context = " ".join(f"Sentence {i} talks about topic {i}." for i in range(30))
    context += " The capital of France is Paris."
    example = {
        "id": "q1",
        "question": "What is the capital of France?",
        "context": context,
        "answers": {"text": ["Paris"], "answer_start": [context.index("Paris")]},
    }
    features = prepare_squad_features(
        [example], tokenizer, max_length=77, doc_stride=26, max_question_length=13
    )
    question = clip_ids([example["question"]])[0][1:-1]
    assert len(features["input_ids"]) > 3
    for ids in features["input_ids"]:
        assert len(ids) <= 77
        assert ids[: len(question) + 3] == [49406, *question, 49407, 49407] and ids[-1] == 49407
    # the window that holds the answer points at it, and its offsets give back its text
    found = [
        (offsets, start, end)
        for offsets, start, end, null in zip(
            features["offset_mapping"],
            features["start_positions"],
            features["end_positions"],
            features["null_index"],
            strict=True,
        )
        if start != null
    ]
    assert found
    offsets, start, end = found[-1]
    assert context[offsets[start][0] : offsets[end][1]] == "Paris"


def test_squad_v2_scores_no_answer_at_each_windows_final_eot(tiny_clip, tmp_path):
    """SPEC 13: under the causal mask the SOT state is the same for every input, so "no answer"
    is scored at the final EOT, which has seen the question and the context: the null logits of
    two questions differ, unanswerable windows are trained to point there, and post-processing
    reads the null score there."""
    context = "The capital of France is Paris."
    rows = [
        ("paris", "What is the capital of France?", ["Paris"]),
        ("mars", "Who is the king of the planet Mars?", []),  # longer: its batch row is unpadded
    ]
    examples = [
        {"id": qid, "question": question, "context": context,
         "answers": {"text": answer, "answer_start": [context.index(a) for a in answer]}}
        for qid, question, answer in rows
    ]  # fmt: skip
    path = tmp_path / "squad.jsonl"
    path.write_text("".join(json.dumps(example) + "\n" for example in examples))
    model = MaCSC(
        backbone=None,
        modalities=["text"],
        task={"kind": "span", "num_labels": 2, "metrics": ["exact", "f1"]},
        objective={"lambda_msb": 0.0},
        text_tower=tower_options(tiny_clip[1]),
    ).eval()
    data = SquadDataModule(
        data_files={"train": str(path), "validation": str(path)},
        max_length=77, doc_stride=26, max_question_length=13, eval_batch_size=2,
    )  # fmt: skip
    data.connect(model.tokenizer, {}, ["text"])
    batch = next(iter(data.val_dataloader()))

    # one window each, SOT question EOT EOT context EOT: the final EOT closes it (the shorter
    # row is padded with EOT too, which is no real token)
    final_eot = [
        len(clip_ids([question])[0]) + len(clip_ids([context])[0]) - 1 for _, question, _ in rows
    ]
    assert batch["null_index"].tolist() == final_eot
    assert batch["input_ids"][[0, 1], final_eot].tolist() == [49407, 49407]
    assert batch["start_positions"][1] == batch["end_positions"][1] == final_eot[1]  # unanswerable
    start, end = batch["start_positions"][0], batch["end_positions"][0]
    assert model.tokenizer.decode(batch["input_ids"][0, start : end + 1]).strip() == "paris"
    # v2 answer positions: the context tokens and the null position, nothing else
    context_tokens = len(clip_ids([context])[0]) - 2
    for row, null in enumerate(final_eot):
        expected = torch.zeros(batch["input_ids"].shape[1], dtype=torch.bool)
        expected[null - context_tokens : null] = True
        expected[null] = True
        assert torch.equal(batch["context_mask"][row], expected)
    # the sentence position (the contrastive feature's row) is that same final EOT
    assert model.network.sentence_rows(batch["attention_mask"])[:, 0].tolist() == final_eot

    with torch.no_grad():
        outputs = model(batch).head.outputs[0]  # (B, l, 2): start and end logits
    null_logits = outputs[[0, 1], final_eot]
    assert torch.equal(outputs[0, 0], outputs[1, 0])  # the SOT cannot tell the questions apart
    assert not torch.allclose(null_logits[0], null_logits[1], atol=1e-4)

    # the null score read by post-processing is start + end at the final EOT
    evaluation = data.span_evaluation("val", "validation")
    starts = [outputs[row, : final_eot[row] + 1, 0].numpy() for row in range(2)]
    ends = [outputs[row, : final_eot[row] + 1, 1].numpy() for row in range(2)]
    _, null_odds = postprocess_qa_predictions(
        evaluation.examples, evaluation.features, starts, ends
    )
    for row, (qid, _, _) in enumerate(rows):
        # 7 context tokens, fewer than n_best and max_answer_length: every span is a candidate
        first = final_eot[row] - context_tokens
        best_span = max(
            float(starts[row][i]) + float(ends[row][j])
            for i in range(first, final_eot[row])
            for j in range(i, final_eot[row])
        )
        null_score = float(starts[row][final_eot[row]]) + float(ends[row][final_eot[row]])
        assert null_odds[qid] == pytest.approx(null_score - best_span, abs=1e-5)


def test_misconfigurations_are_one_clear_line(tiny_clip):
    path = tiny_clip[1]
    with pytest.raises(ConfigError, match="both set.*model.backbone: null"):
        MaCSCNetwork("bert-base-uncased", ["text"], text_tower=tower_options(path))
    with pytest.raises(ConfigError, match="kind 'hf' is not a text tower"):
        build_text_tower({"kind": "hf", "model_name": "bert-base-uncased"})
    with pytest.raises(ConfigError, match="no option 'k'"):
        build_text_tower({**tower_options(path), "k": 4})
    with pytest.raises(ConfigError, match="SOT"):
        MaCSCNetwork(None, ["text"], text_tower=tower_options(path), text_pooling="first")
    with pytest.raises(ConfigError, match="backbone is not set"):
        MaCSCNetwork(None, ["text"])


def test_a_max_length_beyond_the_context_names_the_option(tiny_clip, tmp_path, capsys):
    args = demo_args(tiny_clip[1], tmp_path, "--data.init_args.max_length", "128")
    assert main(["fit", *args]) == 2
    assert "max_length: 77" in capsys.readouterr().err
