"""Top-k selection and window splitting (SPEC 1.3-1.6) on crafted ids and attention scores."""

import warnings

import pytest
import torch
from torch import Tensor

from macsc.errors import ConfigError
from macsc.prototypes import TokenPrototypeExtractor, build_extractor, select_top_k
from macsc.prototypes.selection import attention_layer_indices, build_windows, per_text_view

SOT, EOT, PAD = 100, 200, 0


def test_top_k_keeps_the_best_candidates_in_text_order():
    scores = torch.tensor([[0.9, 0.1, 0.7, 0.3, 0.8, 0.2]])
    candidates = torch.tensor([[False, True, True, True, True, True]])  # position 0 is SOT
    indices, mask = select_top_k(scores, candidates, k=3)
    assert indices.tolist() == [[2, 3, 4]]  # 0.7, 0.3, 0.8 -> in position order; SOT's 0.9 ignored
    assert mask.tolist() == [[True, True, True]]


def test_top_k_pads_rows_with_fewer_candidates_and_masks_them():
    scores = torch.tensor([[0.5, 0.4, 0.3, 0.2], [0.1, 0.2, 0.3, 0.4]])
    candidates = torch.tensor([[False, True, False, True], [False, False, False, False]])
    indices, mask = select_top_k(scores, candidates, k=3)
    assert indices.tolist() == [[1, 3, 0], [0, 0, 0]]
    assert mask.tolist() == [[True, True, False], [False, False, False]]
    wide_indices, wide_mask = select_top_k(scores, candidates, k=6)  # k beyond the length
    assert wide_indices.shape == (2, 6) and wide_mask.sum().item() == 2


def test_top_k_breaks_ties_towards_the_earlier_token():
    scores = torch.tensor([[0.0, 0.5, 0.5, 0.5, 0.1]])
    indices, _ = select_top_k(scores, torch.ones(1, 5, dtype=torch.bool), k=2)
    assert indices.tolist() == [[1, 2]]


def test_windows_carry_their_own_specials_and_candidates():
    windows = build_windows(
        [list(range(1, 11)), [7, 8]],
        prefix=[SOT],
        suffix=[EOT],
        context_length=6,
        pad_id=PAD,
    )
    assert windows.tokens.tolist() == [
        [SOT, 1, 2, 3, 4, EOT],
        [SOT, 5, 6, 7, 8, EOT],
        [SOT, 9, 10, EOT, PAD, PAD],
        [SOT, 7, 8, EOT, PAD, PAD],
    ]
    assert windows.eos.tolist() == [5, 5, 3, 3]
    assert windows.slots.tolist() == [[0, 1, 2], [3, -1, -1]]
    # Candidates: content and EOT, never SOT or padding.
    assert windows.candidates[2].tolist() == [False, True, True, True, False, False]
    assert windows.attention_mask[2].tolist() == [True, True, True, True, False, False]


def test_empty_text_gets_one_window_and_include_eos_false_drops_the_eos_candidate():
    windows = build_windows(
        [[]], prefix=[SOT], suffix=[EOT], context_length=4, pad_id=PAD, include_eos=False
    )
    assert windows.tokens.tolist() == [[SOT, EOT, PAD, PAD]]
    assert not windows.candidates.any()


def test_max_windows_caps_long_texts_and_counts_them():
    windows = build_windows(
        [list(range(1, 30)), [1]],
        prefix=[SOT],
        suffix=[EOT],
        context_length=6,
        pad_id=PAD,
        max_windows=2,
        pad_to_context=False,
    )
    assert windows.truncated == 1
    assert windows.slots.tolist() == [[0, 1], [2, -1]]
    assert windows.tokens[1, 1:5].tolist() == [5, 6, 7, 8]


def test_candidates_of_all_windows_compete_in_one_top_k():
    # Two texts; text 0 has two windows of length 4 and its best tokens sit in both windows.
    scores = torch.tensor(
        [[0.0, 0.9, 0.1, 0.5], [0.0, 0.2, 0.8, 0.3], [0.0, 0.4, 0.6, 0.7]], dtype=torch.float
    )
    candidates = torch.ones(3, 4, dtype=torch.bool)
    candidates[:, 0] = False
    slots = torch.tensor([[0, 1], [2, -1]])
    indices, mask = select_top_k(
        per_text_view(scores, slots), per_text_view(candidates, slots, fill=False), k=3
    )
    # Text 0: 0.9 (window 0 pos 1), 0.5 (window 0 pos 3), 0.8 (window 1 pos 2) in order.
    assert indices[0].tolist() == [1, 3, 6]
    # Text 1 has one window: its absent second window offers nothing.
    assert indices[1].tolist() == [1, 2, 3] and mask.all()


def test_attention_layer_option():
    assert attention_layer_indices("last", 12) == [11]
    assert attention_layer_indices("all", 3) == [0, 1, 2]
    assert attention_layer_indices([-1, 0, 11], 12) == [0, 11]
    for bad in ([12], [], "first"):
        with pytest.raises(ConfigError, match="attention_layers"):
            attention_layer_indices(bad, 12)


class DigitExtractor(TokenPrototypeExtractor):
    """A crafted encoder: token ids are the digits of the text, each token's attention score is
    its id, and its hidden state is ``[id, window index]``. The chosen prototypes are then known
    in advance: the k largest ids, in text order."""

    kind = "digits"

    def __init__(self, **options):
        super().__init__(**options)
        self._finish_setup(
            num_layers=1,
            context_length=6,
            prefix=[SOT],
            suffix=[EOT],
            pad_id=PAD,
            pad_to_context=True,
        )

    @property
    def dim(self) -> int:
        return 2

    def _token_ids(self, texts):
        return [[int(ch) for ch in text] for text in texts]

    def _encode(self, tokens, attention_mask, eos) -> tuple[Tensor, Tensor]:
        scores = tokens.float()  # SOT is never a candidate; EOT (id 200) outranks every digit
        window = torch.arange(len(tokens)).view(-1, 1).expand_as(tokens).float()
        return torch.stack([tokens.float(), window], dim=-1), scores


def test_extract_selects_across_windows_in_original_order():
    extractor = DigitExtractor(k=4, include_eot=False)
    # 10 digits -> windows of 4: "1928", "3746", "05"; the four largest are 9, 8, 7, 6.
    out = extractor.extract(["1928374605", "31"])
    assert out.features[0, :, 0].tolist() == [9, 8, 7, 6]
    assert out.features[0, :, 1].tolist() == [0, 0, 1, 1]  # windows of origin
    assert out.mask[1].tolist() == [True, True, False, False]
    assert out.features[1, :2, 0].tolist() == [3, 1] and not out.features[1, 2:].any()


def test_extract_with_eot_candidate_and_max_windows_warning():
    extractor = DigitExtractor(k=2, include_eot=True, max_windows=1)
    with pytest.warns(UserWarning, match="max_windows=1"):
        out = extractor.extract(["11110000999"])  # only "1111" is seen; EOT outranks it
    assert out.features[0, :, 0].tolist() == [1, EOT]


def test_k_larger_than_a_window_is_a_config_error():
    with pytest.raises(ConfigError, match="k=6"):
        DigitExtractor(k=6)


def test_unknown_option_and_kind_are_config_errors():
    with pytest.raises(ConfigError, match="no option 'dims'") as error:
        build_extractor("audioclip", checkpoint="x.pt", dims=3)
    # options declared once in the shared base are still known by name for every kind
    for inherited in ("attention_layers", "include_eot", "max_windows", "k", "trainable"):
        assert inherited in str(error.value)
    with pytest.raises(ConfigError, match="no option 'dims'"):
        build_extractor("gaussian", dims=3)
    with pytest.raises(ConfigError, match="unknown prototype extractor kind"):
        build_extractor("clip")
    with pytest.raises(ConfigError, match="needs the option 'model_name'"):
        build_extractor("hf")


def _windows(token_ids, **options):
    return build_windows(token_ids, prefix=[SOT], suffix=[EOT], pad_id=PAD, **options)


def test_window_capacity_of_one_token_and_of_none():
    one = build_windows([[1, 2]], prefix=[SOT], suffix=[EOT, EOT], context_length=4, pad_id=PAD)
    assert one.tokens.tolist() == [[SOT, 1, EOT, EOT], [SOT, 2, EOT, EOT]]
    with pytest.raises(ConfigError, match="between the 3 special tokens"):
        build_windows([[1]], prefix=[SOT], suffix=[EOT, EOT], context_length=3, pad_id=PAD)


def test_max_windows_is_a_limit_reached_not_exceeded_and_counts_every_long_text():
    exactly = _windows([list(range(1, 9))], context_length=6, max_windows=2)  # 2 windows of 4
    assert exactly.truncated == 0 and exactly.slots.tolist() == [[0, 1]]
    over = _windows([list(range(1, 10))] * 3, context_length=6, max_windows=2)
    assert over.truncated == 3 and over.tokens.shape[0] == 6
    # the documented default is 16 windows
    assert _windows([[1] * 64], context_length=6).truncated == 0
    default = _windows([[1] * 65], context_length=6)
    assert default.truncated == 1 and default.slots.shape == (1, 16)


def test_window_tensors_have_the_documented_dtypes_and_padding_width():
    padded = _windows([[1, 2], [3]], context_length=8)
    tight = _windows([[1, 2], [3]], context_length=8, pad_to_context=False)
    assert padded.tokens.shape == (2, 8) and tight.tokens.shape == (2, 4)  # SOT 1 2 EOT
    for windows in (padded, tight):
        assert windows.tokens.dtype == windows.eos.dtype == windows.slots.dtype == torch.long
        assert windows.attention_mask.dtype == windows.candidates.dtype == torch.bool
    none = _windows([], context_length=6)
    assert none.tokens.shape[0] == 0 and none.slots.shape == (0, 0)


def test_per_text_view_fills_absent_windows_with_zero_and_keeps_trailing_dims():
    values = torch.arange(1, 3 * 2 * 2 + 1, dtype=torch.float).view(3, 2, 2)  # (W, L, D)
    slots = torch.tensor([[0, 1], [2, -1]])
    view = per_text_view(values, slots)
    assert view.shape == (2, 4, 2)
    assert view[0].tolist() == [[1, 2], [3, 4], [5, 6], [7, 8]]
    assert view[1].tolist() == [[9, 10], [11, 12], [0, 0], [0, 0]]


def test_top_k_ties_follow_text_order_on_a_long_row():
    # a row long enough that an unstable sort is free to reorder equal keys
    scores = torch.zeros(1, 64)
    scores[0, ::7] = 1.0
    indices, mask = select_top_k(scores, torch.ones(1, 64, dtype=torch.bool), k=12)
    assert indices.tolist() == [sorted([*range(0, 64, 7), 1, 2])]  # ten 1.0s, then zeros 1, 2
    assert mask.all()


def test_attention_layer_option_edges():
    assert attention_layer_indices(2, 4) == [2]  # one index
    assert attention_layer_indices(-4, 4) == [0]  # the most negative index allowed
    with pytest.raises(ConfigError, match="attention_layers=True"):
        attention_layer_indices(True, 4)  # a bool is not a block index
    with pytest.raises(ConfigError, match=r"use indices in \[-4, 3\]"):
        attention_layer_indices([4], 4)


class RecordingDigitExtractor(DigitExtractor):
    """DigitExtractor that records the width and the number of windows of every encoder pass,
    with the window padding of the encoder as an option."""

    def __init__(self, pad_to_context: bool = True, **options):
        super().__init__(**options)
        if not pad_to_context:  # else as DigitExtractor's setup left it
            self.pad_to_context = False
        self.passes: list[tuple[int, int]] = []

    def _encode(self, tokens, attention_mask, eos):
        self.passes.append(tuple(tokens.shape))
        return super()._encode(tokens, attention_mask, eos)


def test_extract_encodes_windows_in_batches_of_batch_size():
    extractor = RecordingDigitExtractor(k=2, batch_size=2)
    extractor.extract(["123456789012"])  # 3 windows
    assert extractor.passes == [(2, 6), (1, 6)]
    default = RecordingDigitExtractor(k=2, max_windows=300)
    default.extract(["1" * 4 * 257])  # 257 windows: the default batch is 256
    assert [n for n, _ in default.passes] == [256, 1]


def test_extract_pads_windows_as_the_encoder_asks():
    tight = RecordingDigitExtractor(k=2, pad_to_context=False)
    tight.extract(["12"])
    padded = RecordingDigitExtractor(k=2)
    padded.extract(["12"])
    assert tight.passes == [(1, 4)] and padded.passes == [(1, 6)]


def test_truncation_warns_once_outside_the_extractor_and_default_max_windows_is_16():
    extractor = DigitExtractor(k=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        extractor.extract(["1" * 64])  # 16 windows: no truncation
        assert caught == []
        extractor.extract(["1" * 65])
        extractor.extract(["1" * 65])
    # the warning points at the caller, not inside the extractor (exact frame: the caller's line
    # outside mutmut, whose trampolines add frames)
    assert len(caught) == 1 and not caught[0].filename.endswith("windowed.py")


def test_k_against_the_tokens_a_window_offers():
    # context 6 with one prefix and one suffix: 4 content tokens, plus the EOT as a candidate
    DigitExtractor(k=5, include_eot=True)
    with pytest.raises(ConfigError, match="k=5"):
        DigitExtractor(k=5, include_eot=False)
    with pytest.raises(ConfigError, match="k=8"):
        DigitExtractor()  # the default k is 8


def test_window_options_must_be_positive_integers():
    for name in ("max_windows", "batch_size"):
        for bad in (0, 2.0):
            with pytest.raises(ConfigError, match=f"option {name} must be an integer >= 1"):
                DigitExtractor(k=2, **{name: bad})


def test_a_subclass_without_its_own_init_has_its_parents_options(monkeypatch):
    from macsc.prototypes import base

    monkeypatch.setattr(base, "_REGISTRY", dict(base._REGISTRY))

    @base.register_extractor("gaussian_again")
    class GaussianAgain(base.GaussianExtractor):
        pass

    assert base.extractor_options("gaussian_again") == base.extractor_options("gaussian")
    assert build_extractor("gaussian_again", k=3).k == 3
