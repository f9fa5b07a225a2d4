"""The fast paths of issue 6 compute what the plain ones do (behaviour only, nothing timed)."""

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import Logger
from torch import nn
from transformers import AutoTokenizer

from macsc.method.attention import few_query_attention
from macsc.method.fusion import select_rows, sentence_pool
from macsc.training.heatmaps import ModalityWeightHeatmaps
from macsc.training.module import MaCSC
from tests.method.test_enhancement_eq2 import enhancer_of_one, run_one
from tests.method.test_enhancer_modes import few_query_of_one, stacked_copy

GAUSSIAN = {
    "image": {"kind": "gaussian", "dim": 24, "k": 4},
    "audio": {"kind": "gaussian", "dim": 40, "k": 4, "seed": 1},
}
TASK = {"kind": "classification", "num_labels": 2, "metrics": ["accuracy"]}


def test_few_query_attention_is_the_modules_attention():
    torch.manual_seed(0)
    attention = nn.MultiheadAttention(32, 4, dropout=0.3, batch_first=True).double().eval()
    nn.init.normal_(attention.in_proj_bias)  # non-zero key and value biases
    query = torch.randn(3, 5, 32, dtype=torch.double, requires_grad=True)
    context = torch.randn(3, 9, 32, dtype=torch.double, requires_grad=True)
    padding = torch.zeros(3, 9, dtype=torch.bool)
    padding[0, 6:] = True
    padding[2, 2:5] = True
    stacked = stacked_copy(attention)
    results = []
    for run, module in (
        (lambda: attention(query, context, context, key_padding_mask=padding)[0], attention),
        (
            lambda: few_query_attention(stacked, query[None], context[None], padding[None])[0],
            stacked,
        ),
    ):
        module.zero_grad()
        query.grad = context.grad = None
        out = run()
        out.pow(2).sum().backward()
        weights = [p.grad if module is attention else p.grad[0] for p in module.parameters()]
        grads = [query.grad, context.grad, *weights]
        results.append([out.detach(), *(g.clone() for g in grads)])
    for fast, plain in zip(*results, strict=True):
        torch.testing.assert_close(fast, plain, rtol=1e-10, atol=1e-10)


def test_few_query_attention_applies_the_attention_dropout():
    torch.manual_seed(0)
    attention = nn.MultiheadAttention(16, 2, dropout=0.5, batch_first=True).train()
    query, context = torch.randn(2, 3, 16), torch.randn(2, 7, 16)
    padding = torch.zeros(2, 7, dtype=torch.bool)
    first = few_query_of_one(attention, query, context, padding)
    second = few_query_of_one(attention, query, context, padding)
    assert not torch.allclose(first, second)
    attention.eval()
    expected = attention(query, context, context, key_padding_mask=padding)[0]
    torch.testing.assert_close(few_query_of_one(attention, query, context, padding), expected)


@pytest.mark.parametrize("feed_forward", [False, True])
@pytest.mark.parametrize("enhancement", [True, False])
def test_enhancer_rows_are_rows_of_the_full_result(feed_forward, enhancement):
    torch.manual_seed(0)
    enhancer = enhancer_of_one(
        32, 24, num_heads=4, feed_forward=feed_forward, enhancement=enhancement
    ).eval()
    text = torch.randn(4, 10, 32)
    mask = torch.ones(4, 10, dtype=torch.long)
    mask[1, 6:] = 0
    prototypes, prototype_mask = torch.randn(4, 5, 24), torch.ones(4, 5, dtype=torch.bool)
    prototype_mask[2, 3:] = False
    rows = torch.tensor([[0, 5], [5, 0], [9, 1], [3, 3]])
    full_text, full_prototypes = run_one(enhancer, text, mask, prototypes, prototype_mask)
    some_text, some_prototypes = run_one(
        enhancer, text, mask, prototypes, prototype_mask, text_rows=rows
    )
    assert some_text.shape == (4, 2, 32)
    torch.testing.assert_close(some_text, select_rows(full_text, rows), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(some_prototypes, full_prototypes, rtol=1e-5, atol=1e-5)


def make_batch(model: MaCSC, tokenizer_path: str) -> dict:
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    sentences = ["a red apple", "the sky is very blue today", "snow", "a dog barks at the cat"]
    batch = dict(tokenizer(sentences, padding=True, return_tensors="pt"))
    batch["labels"] = torch.tensor([0, 1, 1, 0])
    batch["prototypes"] = {}
    for name, extractor in model.extractors.items():
        out = extractor.extract(sentences)
        batch["prototypes"][name] = {"features": out.features, "mask": out.mask}
    return batch


@pytest.mark.parametrize("pooling", ["first", "last", "mean"])
def test_pooled_text_branch_matches_the_full_computation(tiny_backbone, pooling):
    model = MaCSC(
        backbone=tiny_backbone,
        modalities=["text", "image", "audio"],
        prototypes=GAUSSIAN,
        task=TASK,
        enhancer={"heads": 4},
        text_pooling=pooling,
    ).eval()
    batch = make_batch(model, tiny_backbone)
    mask = batch["attention_mask"]
    with torch.no_grad():
        text = model.network.backbone(
            input_ids=batch["input_ids"],
            attention_mask=mask,
            token_type_ids=batch["token_type_ids"],
        ).last_hidden_state
        sources = [batch["prototypes"][name] for name in ("image", "audio")]
        enhanced = model.network.enhancers(
            text, mask, [s["features"] for s in sources], [s["mask"] for s in sources]
        )[0]  # every row of Ĥ^t_m: (M', B, l, d)
        expected = sentence_pool(enhanced.mean(0), mask, pooling)
        torch.testing.assert_close(model(batch).features[0], expected, rtol=1e-5, atol=1e-5)


class RecordingLogger(Logger):
    def __init__(self) -> None:
        super().__init__()
        self.steps: dict[int, set[str]] = {}

    @property
    def name(self) -> str:
        return "recording"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics, step=None) -> None:
        self.steps.setdefault(step, set()).update(metrics)


def test_logger_gets_every_value_at_every_log_step(tiny_backbone):
    model = MaCSC(
        backbone=tiny_backbone,
        modalities=["text", "image", "audio"],
        prototypes=GAUSSIAN,
        task=TASK,
        enhancer={"heads": 4},
    )
    batch = make_batch(model, tiny_backbone)
    logger = RecordingLogger()
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=6,
        log_every_n_steps=2,
        logger=logger,
        limit_val_batches=0,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    loader = torch.utils.data.DataLoader([batch] * 6, batch_size=None, collate_fn=lambda b: b)
    trainer.fit(model, train_dataloaders=loader)
    assert sorted(logger.steps) == [1, 3, 5]
    expected = {"loss/total", "loss/wa", "loss/msb", "lr", "weights/rho/audio"}
    expected |= {"loss/pair/text->image", "weights/pair/audio->text"}
    for tags in logger.steps.values():
        assert expected <= tags
    heatmaps = next(c for c in trainer.callbacks if isinstance(c, ModalityWeightHeatmaps))
    assert heatmaps._count == 6  # the heatmap's mean still sees every step


def test_optimizer_is_fused_adamw_on_cpu(tiny_backbone):
    model = MaCSC(
        backbone=tiny_backbone, modalities=["text"], task=TASK, objective={"lambda_msb": 0.0}
    )
    trainer = L.Trainer(accelerator="cpu", max_steps=10, logger=False)
    model.trainer = trainer
    optimizer = model.configure_optimizers()["optimizer"]
    assert isinstance(optimizer, torch.optim.AdamW)
    assert optimizer.defaults["fused"]
