"""The prototype cache (SPEC 8): keyed by everything that changes a prototype, memory-mapped,
bit-identical to extraction without it, and never fooled by a damaged or half-written file."""

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from macsc.errors import ConfigError, DataError
from macsc.prototypes import (
    GaussianExtractor,
    build_extractor,
    build_prototype_cache,
    prototype_table,
    sampled_ranges,
    verify_cache_file,
)
from macsc.prototypes.cache_files import SAMPLE_BLOCK_BYTES, SAMPLE_BLOCKS
from tests.prototypes.test_clip import audioclip_state

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
    options = {"batch_size": 2, "progress": False, "dtype": "float32"}
    plain = prototype_table(extractor, TEXTS, cache_dir=False, **options)
    built = prototype_table(extractor, TEXTS, cache_dir=tmp_path, **options)
    read = prototype_table(extractor, TEXTS, cache_dir=tmp_path, **options)
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


def flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as handle:
        handle.seek(offset)
        value = handle.read(1)[0]
        handle.seek(offset)
        handle.write(bytes([value ^ 0xFF]))


def test_stored_in_half_precision_by_default_and_the_dtype_is_part_of_the_key(tmp_path):
    extractor = CountingGaussian(dim=8, k=3)
    exact = GaussianExtractor(dim=8, k=3).extract(["a cat", "a dog", "", "rain on a tin roof"])
    rows = [0, 1, 0, 2, 3, 1]  # TEXTS' distinct rows
    paths = {}
    for dtype, expected, itemsize in (
        ("float16", exact.features.half(), 2),
        ("bfloat16", exact.features.bfloat16(), 2),
        ("float32", exact.features, 4),
    ):
        built = prototype_table(extractor, TEXTS, progress=False, cache_dir=tmp_path, dtype=dtype)
        read = prototype_table(extractor, TEXTS, progress=False, cache_dir=tmp_path, dtype=dtype)
        assert built.features.dtype == read.features.dtype == expected.dtype
        assert torch.equal(read.lookup(list(range(6))).features, expected[rows])
        # header, then U x k x d values of the dtype, then the U x k mask bytes
        assert read.path.stat().st_size == 4096 + 4 * 3 * 8 * itemsize + 4 * 3
        paths[dtype] = read.path
    assert len(set(paths.values())) == 3 and extractor.extracted == 3 * 4
    auto = prototype_table(extractor, TEXTS, progress=False, cache_dir=tmp_path)
    assert auto.path == paths["float16"]  # extraction ran in float32 here: auto stores float16
    plain = prototype_table(extractor, TEXTS, progress=False, cache_dir=False)
    assert plain.features.dtype == torch.float16 and torch.equal(plain.features, auto.features)
    with pytest.raises(ConfigError, match="prototype_dtype='half'.*float16"):
        prototype_table(extractor, TEXTS, progress=False, cache_dir=tmp_path, dtype="half")


def test_float16_storage_refuses_values_beyond_its_range(tmp_path):
    loud = GaussianExtractor(dim=8, k=3, std=1e6)
    with pytest.raises(DataError, match="beyond float16's range.*prototype_dtype: bfloat16"):
        prototype_table(loud, TEXTS, progress=False, cache_dir=tmp_path)
    assert not entries(tmp_path)
    table = prototype_table(loud, TEXTS, progress=False, cache_dir=tmp_path, dtype="bfloat16")
    assert torch.isfinite(table.features.float()).all()


def test_open_checks_sampled_blocks_and_verify_reads_every_byte(tmp_path):
    texts = [f"sentence {i}" for i in range(200)]
    extractor = CountingGaussian(dim=512, k=8)
    expected = GaussianExtractor(dim=512, k=8).extract(texts).features.half()
    path = build_prototype_cache(extractor, texts, progress=False, cache_dir=tmp_path)
    size = path.stat().st_size  # 4096 + 200 * 8 * 512 * 2 + 1600: ~100 blocks, more than sampled
    ranges = sampled_ranges(path)
    assert len(ranges) == SAMPLE_BLOCKS and (size - 4096) > SAMPLE_BLOCKS * SAMPLE_BLOCK_BYTES
    assert ranges[0][0] == 4096 and sum(ranges[-1]) == size  # the first and the last block
    assert verify_cache_file(path).status == "ok"

    # A flipped byte inside a sampled block: caught at open, the entry is rebuilt.
    offset, length = ranges[len(ranges) // 2]
    flip_byte(path, offset + length // 2)
    with pytest.warns(UserWarning, match="sampled blocks.*rebuilding"):
        table = prototype_table(extractor, texts, progress=False, cache_dir=tmp_path)
    assert extractor.extracted == 2 * len(texts)
    assert torch.equal(table.lookup(list(range(200))).features, expected)

    # Outside the sample: the open reads only ~1 MiB and does not see it (the documented limit);
    # the full check of --verify does.
    sampled = {(o - 4096) // SAMPLE_BLOCK_BYTES for o, _ in sampled_ranges(path)}
    unsampled = next(b for b in range(1, (size - 4096) // SAMPLE_BLOCK_BYTES) if b not in sampled)
    flip_byte(path, 4096 + unsampled * SAMPLE_BLOCK_BYTES + 100)
    prototype_table(extractor, texts, progress=False, cache_dir=tmp_path)
    assert extractor.extracted == 2 * len(texts)
    check = verify_cache_file(path)
    assert check.status == "damaged" and "checksum" in check.reason


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
        assert [w.wait() for w in workers] == [0, 0]
    finally:
        for w in workers:
            w.kill()
    expected = GaussianExtractor(dim=16, k=2).extract(texts).features.half()
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
        process.wait()
    assert not entries(cache) and len(list(cache.glob(".*.tmp"))) == 1  # only a partial file

    extractor = CountingGaussian(dim=16, k=2)
    table = prototype_table(extractor, texts, progress=False, cache_dir=cache)
    assert extractor.extracted == len(texts)  # rebuilt from scratch, nothing of the partial read
    expected = GaussianExtractor(dim=16, k=2).extract(texts).features.half()
    assert torch.equal(table.lookup(list(range(len(texts)))).features, expected)
    assert len(entries(cache)) == 1 and not list(cache.glob(".*.tmp"))  # the leftover is gone
