"""The prototype cache (SPEC 8): keyed by everything that changes a prototype, memory-mapped,
bit-identical to extraction without it, and never fooled by a damaged or half-written file."""

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from test_prototypes_clip import audioclip_state

from macsc.prototypes import (
    GaussianExtractor,
    build_extractor,
    build_prototype_cache,
    prototype_table,
)

TEXTS = ["a cat", "a dog", "a cat", "", "rain on a tin roof", "a dog"]


class CountingGaussian(GaussianExtractor):
    """Gaussian prototypes that count how many texts they were asked for."""

    def __init__(self, **options):
        super().__init__(**options)
        self.extracted = 0

    def _extract(self, texts):
        self.extracted += len(texts)
        return super()._extract(texts)


def entries(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.protos"))


def table_values(table, count):
    out = table.lookup(list(range(count)))
    return out.features, out.mask


@pytest.fixture
def audioclip(tmp_path):
    path = tmp_path / "AudioCLIP-Full-Training.pt"
    torch.save(audioclip_state(), path)
    return build_extractor("audioclip", checkpoint=str(path), k=4), path


def test_cached_prototypes_are_bit_identical_to_uncached_ones(audioclip, tmp_path):
    extractor, _ = audioclip
    plain = prototype_table(extractor, TEXTS, batch_size=2, progress=False, cache_dir=False)
    built = prototype_table(extractor, TEXTS, batch_size=2, progress=False, cache_dir=tmp_path)
    read = prototype_table(extractor, TEXTS, batch_size=2, progress=False, cache_dir=tmp_path)
    assert plain.path is None and built.path == read.path and len(entries(tmp_path)) == 1
    for table in (built, read):
        assert torch.equal(table.features, plain.features) and torch.equal(table.mask, plain.mask)
        assert table.rows.tolist() == [0, 1, 0, 2, 3, 1]
    # Batching may move the last bits, nothing more.
    torch.testing.assert_close(
        table_values(read, 6)[0], extractor.extract(TEXTS).features, atol=1e-4, rtol=1e-4
    )


def test_second_call_reads_and_the_file_is_memory_mapped(tmp_path):
    extractor = CountingGaussian(dim=8, k=3)
    path = build_prototype_cache(extractor, TEXTS, progress=False, cache_dir=tmp_path)
    assert extractor.extracted == 4  # each distinct text once
    table = prototype_table(extractor, TEXTS, progress=False, cache_dir=tmp_path)
    assert extractor.extracted == 4 and table.path == path
    maps = Path("/proc/self/maps")
    if maps.exists():
        assert str(path) in maps.read_text()
    table.features[0] += 1  # copy-on-write: the file keeps its data
    again = prototype_table(extractor, TEXTS, progress=False, cache_dir=tmp_path)
    assert not torch.equal(again.features[0], table.features[0]) and extractor.extracted == 4


@pytest.mark.parametrize("damage", ["truncate", "append", "flip", "header"])
def test_damaged_cache_file_is_rebuilt_not_read(damage, tmp_path):
    extractor = CountingGaussian(dim=8, k=3)
    expected = prototype_table(extractor, TEXTS, progress=False, cache_dir=False)
    path = build_prototype_cache(extractor, TEXTS, progress=False, cache_dir=tmp_path)
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[:-7]
    elif damage == "append":
        data += b"\0" * 8
    elif damage == "flip":
        data[4200] ^= 0xFF  # inside the feature data, after the header
    else:
        data[:20] = b"x" * 20
    path.write_bytes(bytes(data))
    before = extractor.extracted
    with pytest.warns(UserWarning, match="unusable.*rebuilding"):
        table = prototype_table(extractor, TEXTS, progress=False, cache_dir=tmp_path)
    assert extractor.extracted == before + 4
    assert torch.equal(table.features, expected.features)
    assert path.stat().st_size == len(path.read_bytes()) and entries(tmp_path) == [path]


def test_key_follows_options_texts_and_checkpoint_content(audioclip, tmp_path):
    def key(extractor, texts=TEXTS):
        return build_prototype_cache(extractor, texts, progress=False, cache_dir=tmp_path).name

    base = key(GaussianExtractor(dim=8, k=3))
    assert key(GaussianExtractor(dim=8, k=3)) == base
    assert (
        len({base, key(GaussianExtractor(dim=8, k=2)), key(GaussianExtractor(dim=8, k=3, seed=1))})
        == 3
    )
    assert key(GaussianExtractor(dim=8, k=3), TEXTS[::-1]) != base
    assert key(GaussianExtractor(dim=8, k=3), TEXTS + ["a cat"]) == base  # same distinct texts

    extractor, checkpoint = audioclip
    first = key(extractor)
    assert (
        key(build_extractor("audioclip", checkpoint=str(checkpoint), k=4, include_eot=False))
        != first
    )
    state = audioclip_state()
    state["ln_final.bias"] += 1.0
    torch.save(state, checkpoint)  # same path, new content
    assert key(build_extractor("audioclip", checkpoint=str(checkpoint), k=4)) != first


def test_cache_folder_comes_from_the_environment_and_can_be_turned_off(tmp_path, monkeypatch):
    monkeypatch.setenv("MACSC_CACHE", str(tmp_path / "env"))
    extractor = CountingGaussian(dim=4, k=2)
    table = prototype_table(extractor, TEXTS, progress=False)
    assert table.path is not None and table.path.parent == tmp_path / "env"
    off = prototype_table(extractor, TEXTS, progress=False, cache_dir=False)
    assert off.path is None and torch.equal(off.features, table.features)


def test_trainable_extractors_are_never_cached(tmp_path):
    extractor = CountingGaussian(dim=4, k=2)
    extractor.trainable = True
    assert build_prototype_cache(extractor, TEXTS, progress=False, cache_dir=tmp_path) is None
    table = prototype_table(extractor, TEXTS, progress=False, cache_dir=tmp_path)
    assert table.path is None and not list(tmp_path.iterdir())


def test_two_processes_building_one_entry_both_get_correct_prototypes(tmp_path):
    texts = [f"sentence number {i}" for i in range(4000)]
    worker = textwrap.dedent(
        """
        import sys, time
        from pathlib import Path
        import numpy as np
        from macsc.prototypes import GaussianExtractor, prototype_table
        name, cache, texts = sys.argv[1], sys.argv[2], [f"sentence number {i}" for i in range(4000)]
        folder = Path(cache).parent
        (folder / f"{name}.ready").touch()
        while not (folder / "go").exists():
            time.sleep(0.005)
        calls = []
        class Counting(GaussianExtractor):
            def _extract(self, batch):
                calls.append(len(batch))
                return super()._extract(batch)
        table = prototype_table(Counting(dim=16, k=2), texts, progress=False, cache_dir=cache)
        np.save(folder / f"{name}.npy", table.lookup(list(range(len(texts)))).features.numpy())
        (folder / f"{name}.count").write_text(str(sum(calls)))
        """
    )
    cache = tmp_path / "cache"
    workers = [
        subprocess.Popen([sys.executable, "-c", worker, name, str(cache)]) for name in ("a", "b")
    ]
    try:
        while not all((tmp_path / f"{name}.ready").exists() for name in ("a", "b")):
            assert all(w.poll() is None for w in workers), "a worker died before the race"
        (tmp_path / "go").touch()
        assert [w.wait(timeout=120) for w in workers] == [0, 0]
    finally:
        for w in workers:
            w.kill()
    expected = GaussianExtractor(dim=16, k=2).extract(texts).features
    import numpy as np

    for name in ("a", "b"):
        assert torch.equal(torch.from_numpy(np.load(tmp_path / f"{name}.npy")), expected)
    assert len(entries(cache)) == 1 and not list(cache.glob(".*.tmp"))
    # The lock let exactly one of them extract; the other waited and read.
    assert sum(int((tmp_path / f"{name}.count").read_text()) for name in ("a", "b")) == len(texts)


def test_empty_text_list(tmp_path):
    table = prototype_table(GaussianExtractor(dim=4, k=2), [], progress=False, cache_dir=tmp_path)
    assert table.features.shape == (0, 2, 4) and len(table) == 0


def test_build_killed_midway_leaves_no_entry_and_the_next_run_rebuilds_it(tmp_path):
    texts = [f"text number {i}" for i in range(300)]
    worker = textwrap.dedent(
        """
        import sys, time
        from pathlib import Path
        from macsc.prototypes import GaussianExtractor, prototype_table
        class Slow(GaussianExtractor):
            def _extract(self, batch):
                Path(sys.argv[2]).touch()  # the build has started writing
                time.sleep(0.1)
                return super()._extract(batch)
        texts = [f"text number {i}" for i in range(300)]
        prototype_table(Slow(dim=16, k=2), texts, batch_size=10, progress=False, cache_dir=sys.argv[1])
        """
    )
    cache, started = tmp_path / "cache", tmp_path / "started"
    process = subprocess.Popen([sys.executable, "-c", worker, str(cache), str(started)])
    try:
        while not started.exists():
            assert process.poll() is None, "the build ended before it could be killed"
        time.sleep(0.3)  # a few batches in
    finally:
        process.kill()  # SIGKILL: no cleanup runs
        process.wait(timeout=30)
    assert not entries(cache) and len(list(cache.glob(".*.tmp"))) == 1  # only a partial file

    extractor = CountingGaussian(dim=16, k=2)
    table = prototype_table(extractor, texts, progress=False, cache_dir=cache)
    assert extractor.extracted == len(texts)  # rebuilt from scratch, nothing of the partial read
    expected = GaussianExtractor(dim=16, k=2).extract(texts).features
    assert torch.equal(table.lookup(list(range(len(texts)))).features, expected)
    assert len(entries(cache)) == 1 and not list(cache.glob(".*.tmp"))  # the leftover is gone
