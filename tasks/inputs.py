"""Raw inputs: what a trained model reads outside any data file (:mod:`macsc.inference`).

:class:`RawInputs` is part of :class:`tasks.base.MaCSCDataModule` (kept here so that module
stays readable): a task names the fields of one input (:meth:`RawInputs.input_fields`), and
its inputs then become an unlabelled split that is tokenised and given prototypes as a split
read from its files is, by the same code.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch.utils.data import DataLoader

from macsc.errors import ConfigError
from tasks.splits import TextSplit, input_records


class RawInputs:
    """The raw-input side of :class:`tasks.base.MaCSCDataModule`."""

    def input_fields(self) -> list[str]:
        """The fields of one raw input, one per text segment (``["sentence"]``,
        ``["question", "context"]``): what :meth:`inputs_split` reads."""
        raise ConfigError(
            f"{type(self).__name__} reads no raw inputs: a trained model of this task cannot "
            "run on text given directly (give the data module an input_fields() method)"
        )

    def inputs_split(self, name: str, inputs: Sequence[Any]) -> TextSplit:
        """Raw inputs as the unlabelled split ``name``: each a string (one field), a list of
        one string per :meth:`input_fields`, or a mapping with them (and an ``id``, else the
        input's position is its id)."""
        fields = self.input_fields()
        records = input_records(inputs, fields)
        return TextSplit(
            name,
            "the inputs given",
            [[record[field] for record in records] for field in fields],
            None,
            [record.get("id", position) for position, record in enumerate(records)],
        )

    def inputs_dataloader(self, split: TextSplit) -> DataLoader:
        """Batches of ``split`` (:meth:`inputs_split`), in order, made as those of a split
        read from its files are: tokenised by ``tokenize``, with prototypes from the prototype
        cache (or extracted and stored there), ``eval_batch_size`` at a time. Only the tokens
        skip the token cache: inputs come once. The split is then the one of its name for
        ``evaluation_split`` and so for the records the model's head writes."""
        name = split.name
        for known in (self._texts, self._tables, self._encoded, self._indexed):
            known.pop(name, None)
        self._texts[name] = split
        self._prototype_tables(name, split)
        self._encoded[name] = self.encoded_split(split, self.tokenize(split))
        return self._loader(name, self._encoded[name], self.eval_batch_size)
