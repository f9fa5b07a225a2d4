"""The CLIP-family text towers (open_clip, AudioCLIP, CLIP-ViP) behind one extraction path.

All three are causal CLIP text transformers read with CLIP's BPE tokenizer (context 77,
``SOT ... EOT``). They differ only in how their modules are laid out, so each layout is a small
:class:`ClipTextTower` adapter and :class:`ClipTextExtractor` does the rest once.

EOT-row attention is recomputed from each scored block's *input* and that block's own projection
weights, captured with a forward pre-hook while the tower runs its own, unmodified forward (fast
fused attention included). This is version-proof (no private flag such as ``need_weights`` has to
be forced) and cheap: one query row and one key projection per scored block.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from macsc.errors import ConfigError
from macsc.prototypes.selection import build_windows
from macsc.prototypes.windowed import TokenPrototypeExtractor


def eot_row_attention(query: Tensor, keys: Tensor, eos: Tensor, scale: float) -> Tensor:
    """Causal attention probabilities of the EOT row.

    query: ``(B, H, hd)`` the EOT row's query, keys: ``(B, L, H, hd)``, eos: ``(B,)``.
    Returns ``(B, H, L)``; positions after ``eos`` get 0, as under the tower's causal mask.
    """
    logits = torch.einsum("bhd,blhd->bhl", query.float(), keys.float()) * scale
    positions = torch.arange(keys.shape[1], device=keys.device)
    future = positions.unsqueeze(0) > eos.unsqueeze(1)
    return logits.masked_fill(future.unsqueeze(1), float("-inf")).softmax(dim=-1)


def _rows(x: Tensor, eos: Tensor) -> Tensor:
    """``x (B, L, ...)`` at position ``eos[b]`` of each row -> ``(B, ...)``."""
    return x[torch.arange(x.shape[0], device=x.device), eos]


class ClipTextTower(nn.Module):
    """Adapter over one layout of a causal CLIP text transformer.

    Subclasses expose the blocks to score, recompute a block's EOT-row attention from its input,
    run the tower's own forward to the final-norm hidden states, and apply the text projection.
    """

    width: int
    output_dim: int
    context_length: int
    batch_first: bool = True

    @property
    def blocks(self) -> list[nn.Module]:
        raise NotImplementedError

    def eot_attention(self, block: nn.Module, x: Tensor, eos: Tensor) -> Tensor:
        """Attention ``(B, H, L)`` of block ``block`` from row ``eos``; ``x (B, L, width)`` is the
        block's input."""
        raise NotImplementedError

    def hidden_states(self, tokens: Tensor) -> Tensor:
        """``tokens (B, L)`` -> ``(B, L, width)`` after the final LayerNorm."""
        raise NotImplementedError

    def project(self, hidden: Tensor) -> Tensor:
        """``(..., width)`` -> ``(..., output_dim)``."""
        raise NotImplementedError


class OpenClipTextTower(ClipTextTower):
    """open_clip's ``TextTransformer`` (OpenAI key names: ``token_embedding``,
    ``transformer.resblocks.N.{ln_1, attn.in_proj_weight, ...}``, ``ln_final``,
    ``text_projection``); used for open_clip models and for AudioCLIP's text branch."""

    def __init__(self, text: nn.Module) -> None:
        super().__init__()
        if getattr(text, "cls_emb", None) is not None or getattr(text, "attn_mask", None) is None:
            raise ConfigError(
                "this open_clip text tower is not a causal CLIP text transformer (it has a class "
                "token or bidirectional attention), so it has no EOT row to rank tokens by"
            )
        for block in text.transformer.resblocks:
            attention = getattr(block, "attn", None)
            if not isinstance(attention, nn.MultiheadAttention) or attention.in_proj_weight is None:
                raise ConfigError(
                    f"open_clip text block {type(block).__name__} has no standard "
                    "nn.MultiheadAttention; this extractor supports the standard CLIP blocks"
                )
        text.output_tokens = True
        self.text = text
        self.width = text.width
        self.output_dim = text.output_dim if text.text_projection is not None else text.width
        self.context_length = text.context_length
        self.batch_first = getattr(text.transformer, "batch_first", True)

    @property
    def blocks(self) -> list[nn.Module]:
        return list(self.text.transformer.resblocks)

    def eot_attention(self, block: nn.Module, x: Tensor, eos: Tensor) -> Tensor:
        attention: nn.MultiheadAttention = block.attn
        heads = attention.num_heads
        head_dim = attention.embed_dim // heads
        normed = block.ln_1(x)
        w_q, w_k, _ = attention.in_proj_weight.chunk(3)
        b_q, b_k, _ = (
            attention.in_proj_bias.chunk(3)
            if attention.in_proj_bias is not None
            else (None, None, None)
        )
        query = F.linear(_rows(normed, eos), w_q, b_q).view(-1, heads, head_dim)
        keys = F.linear(normed, w_k, b_k).view(*normed.shape[:2], heads, head_dim)
        return eot_row_attention(query, keys, eos, head_dim**-0.5)

    def hidden_states(self, tokens: Tensor) -> Tensor:
        return self.text(tokens)[1]

    def project(self, hidden: Tensor) -> Tensor:
        projection = self.text.text_projection
        if projection is None:
            return hidden
        if isinstance(projection, nn.Linear):
            return projection(hidden)
        return hidden @ projection


class HFClipTextTower(ClipTextTower):
    """A Hugging Face ``CLIPTextModel`` plus a bias-free ``text_projection`` (CLIP-ViP)."""

    def __init__(self, model: nn.Module, projection: nn.Linear) -> None:
        super().__init__()
        self.model = model
        self.text_projection = projection
        config = model.config
        self.width = config.hidden_size
        self.output_dim = projection.out_features
        self.context_length = config.max_position_embeddings

    @property
    def blocks(self) -> list[nn.Module]:
        # transformers 4.x nests the transformer under ``text_model``; 5.x does not.
        core = getattr(self.model, "text_model", self.model)
        return list(core.encoder.layers)

    def eot_attention(self, block: nn.Module, x: Tensor, eos: Tensor) -> Tensor:
        attention = block.self_attn
        heads, head_dim = attention.num_heads, attention.head_dim
        normed = block.layer_norm1(x)
        query = attention.q_proj(_rows(normed, eos)).view(-1, heads, head_dim)
        keys = attention.k_proj(normed).view(*normed.shape[:2], heads, head_dim)
        return eot_row_attention(query, keys, eos, attention.scale)

    def hidden_states(self, tokens: Tensor) -> Tensor:
        # No padding mask: under the causal mask no real token ever sees a padding position.
        return self.model(input_ids=tokens).last_hidden_state

    def project(self, hidden: Tensor) -> Tensor:
        return self.text_projection(hidden)


def clip_tokenizer(context_length: int = 77) -> Any:
    """open_clip's CLIP BPE tokenizer (its bundled vocabulary: nothing is downloaded)."""
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer(context_length=context_length)


def tokenizer_identity(tokenizer: Any) -> str:
    """What changes the token ids: the class, the text cleaning and the vocabulary."""
    vocabulary = hashlib.sha256(repr(sorted(tokenizer.encoder.items())).encode()).hexdigest()
    clean = getattr(tokenizer.clean_fn, "__name__", type(tokenizer.clean_fn).__name__)
    return f"{type(tokenizer).__name__}:{clean}:{vocabulary[:16]}"


def _block_input(args: tuple, kwargs: dict[str, Any]) -> Tensor:
    if args:
        return args[0]
    for name in ("hidden_states", "q_x", "x"):
        if name in kwargs:
            return kwargs[name]
    raise RuntimeError(f"cannot find the block input among keyword arguments {sorted(kwargs)}")


class ClipTextExtractor(TokenPrototypeExtractor):
    """Prototypes from a causal CLIP text tower: SPEC 1 steps 1-6 with CLIP's BPE (SOT/EOT)."""

    def __init__(self, tower: ClipTextTower, tokenizer: Any, /, **options: Any) -> None:
        super().__init__(**options)
        self.tower = tower
        self.tokenizer = tokenizer
        self._tokenizer_identity = tokenizer_identity(tokenizer)
        self._finish_setup(
            num_layers=len(tower.blocks),
            context_length=tower.context_length,
            prefix=[tokenizer.sot_token_id],
            suffix=[tokenizer.eot_token_id],
            pad_id=0,
            pad_to_context=True,
        )

    @property
    def dim(self) -> int:
        return self.tower.output_dim

    def identity(self) -> dict[str, Any]:
        return {**super().identity(), "tokenizer": self._tokenizer_identity}

    def _token_ids(self, texts: list[str]) -> list[list[int]]:
        return [self.tokenizer.encode(text) for text in texts]

    def _encode(self, tokens: Tensor, attention_mask: Tensor, eos: Tensor) -> tuple[Tensor, Tensor]:
        blocks = self.tower.blocks
        rows: list[Tensor] = []

        def record(block: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
            x = _block_input(args, kwargs)
            if not self.tower.batch_first:
                x = x.transpose(0, 1)
            with torch.no_grad():
                rows.append(self.tower.eot_attention(block, x.detach(), eos).mean(dim=1))

        handles = [
            blocks[index].register_forward_pre_hook(record, with_kwargs=True)
            for index in self.layers
        ]
        try:
            hidden = self.tower.hidden_states(tokens)
        finally:
            for handle in handles:
                handle.remove()
        if len(rows) != len(self.layers):
            raise RuntimeError(
                f"the {self.kind} text tower ran {len(rows)} of the {len(self.layers)} scored "
                "blocks through their forward hooks (compiled or scripted tower?)"
            )
        return hidden, torch.stack(rows).mean(dim=0)

    def _project(self, hidden: Tensor) -> Tensor:
        return self.tower.project(hidden)

    def embed(self, texts: list[str]) -> Tensor:
        """The pooled, projected text embedding of each text, ``(len(texts), dim)``: the EOT
        row's final-norm state through the text projection, what CLIP's ``encode_text`` returns
        (not normalised). A text longer than the context keeps its first window, as CLIP's
        tokenizer truncates; used by the visual-reasoning probes (SPEC 11, the CLIP row)."""
        windows = build_windows(
            self._token_ids(list(texts)),
            prefix=self.prefix,
            suffix=self.suffix,
            context_length=self.context_length,
            pad_id=self.pad_id,
            max_windows=1,
            pad_to_context=self.pad_to_context,
        )
        device = self.device
        parts = []
        with torch.set_grad_enabled(self.trainable and torch.is_grad_enabled()):
            for start in range(0, len(windows.tokens), self.batch_size):
                tokens = windows.tokens[start : start + self.batch_size].to(device)
                eos = windows.eos[start : start + self.batch_size].to(device)
                hidden = self.tower.hidden_states(tokens)
                parts.append(self.tower.project(_rows(hidden, eos)))
        if not parts:
            return torch.empty(0, self.dim, device=device)
        return torch.cat(parts)
