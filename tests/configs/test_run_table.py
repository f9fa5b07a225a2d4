"""scripts/run_table.py: the commands a table runs, the SLURM array script, the rows as data."""

import itertools
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from macsc.analysis.report import paper_results

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "run_table.py"


def run_table(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True, cwd=ROOT
    )


def commands(out: str) -> list[list[str]]:
    return [shlex.split(line)[1:] for line in out.splitlines() if line.startswith("macsc ")]


def test_dry_run_prints_fit_then_validate_for_every_run_of_table_1():
    result = run_table("--table", "1", "--dry-run", "--", "--trainer.devices", "4")
    assert result.returncode == 0, result.stderr
    runs = commands(result.stdout)
    # fit and validate; 6 rows of ours, BERT +None's 4 and RoBERTa +None's 6 grid points, x 6 tasks
    assert len(runs) == 2 * (6 + 4 + 6) * 6
    where = [
        "--trainer.default_root_dir",
        "runs/tables/sst2/bert-base_none_T/lr=5e-5",
        "--trainer.logger.init_args.save_dir",
        "runs/tables",
        "--trainer.logger.init_args.name",
        "sst2/bert-base_none_T/lr=5e-5",
        "--trainer.logger.init_args.version",
        "0",
    ]
    configs = [
        "--config",
        "lightning_configs/glue_sst2.yaml",
        "--config",
        "lightning_configs/baselines/glue/bert_base.yaml",
        "--model.optimizer.learning_rate",
        "5e-5",
    ]
    assert runs[0] == ["fit", *configs, *where, "--trainer.devices", "4"]
    assert runs[1] == [
        "validate",
        *configs,
        *where,
        "--trainer.devices",
        "4",
        "--ckpt_path",
        "<best checkpoint in runs/tables/sst2/bert-base_none_T/lr=5e-5/version_0/checkpoints>",
    ]
    # the options after -- are in what the dry run says the run trains with: 4 x 4 devices
    assert "# settings: batch 4 per device x 4 devices = 16 in all, lr 5e-5 " in result.stdout
    roberta = next(r for r in runs if "roberta-base_ours_T+I" in " ".join(r) and r[0] == "fit")
    assert roberta[1:7] == [
        "--config",
        "lightning_configs/glue_sst2.yaml",
        "--config",
        "lightning_configs/ablations/roberta_base.yaml",
        "--config",
        "lightning_configs/ablations/image_only.yaml",
    ]
    assert (
        "# skipped Table 1 bert-base/voken/T+I (6 runs: sst2, qnli, qqp, mnli, mrpc, stsb): "
        "VOKEN: reported by the paper from other papers, not a MaCSC run"
    ) in result.stdout
    assert result.stdout.startswith("# Table 1: GLUE (dev). Estimate: ")
    assert result.stdout.rstrip().endswith("# 96 runs to do, 36 skipped")


def test_a_row_two_tables_share_runs_once():
    out = run_table("--table", "1,4", "--dry-run").stdout
    assert out.count("# Table 1, 4 bert-base/ours/T+I+A+V / mnli\n") == 1
    fits = [r for r in commands(out) if r[0] == "fit"]
    names = [r[r.index("--trainer.logger.init_args.name") + 1] for r in fits]
    # Table 4 adds its four ablation rows and three MC-PTM rows
    assert len(names) == len(set(names)) == 96 + 7 * 6


def test_rows_whose_configs_do_not_exist_yet_say_so(tmp_path):
    rows = tmp_path / "rows.yaml"
    rows.write_text(
        yaml.safe_dump(
            {
                "columns": {"sst2": {"base": "glue_sst2.yaml"}, "gen": {"base": "not_yet.yaml"}},
                "tables": {
                    1: {
                        "title": "t",
                        "estimate": "e",
                        "time_limit": "01:00:00",
                        "columns": ["sst2", "gen"],
                        "rows": [
                            {"row": "a/ours/T", "overlays": ["tables/not_there.yaml"]},
                            {"row": "b/ours/T", "overlays": []},
                        ],
                    }
                },
            }
        )
    )
    result = run_table("--rows", rows, "--table", "1", "--runs-dir", tmp_path / "runs", "--dry-run")
    assert result.returncode == 0, result.stderr
    assert (
        "# skipped Table 1 a/ours/T (1 run: sst2): overlay "
        "lightning_configs/tables/not_there.yaml is not available yet"
    ) in result.stdout
    assert (
        "# skipped Table 1 b/ours/T (1 run: gen): base config lightning_configs/not_yet.yaml "
        "is not available yet"
    ) in result.stdout
    assert [r[:3] for r in commands(result.stdout)] == [
        ["fit", "--config", "lightning_configs/glue_sst2.yaml"],
        ["validate", "--config", "lightning_configs/glue_sst2.yaml"],
    ]
    # a finished run (validate.done) is not run again
    done = tmp_path / "runs" / "sst2" / "b_ours_T" / "validate.done"
    done.parent.mkdir(parents=True)
    done.touch()
    again = run_table("--rows", rows, "--table", "1", "--runs-dir", tmp_path / "runs")
    assert again.returncode == 0, again.stderr
    assert "done already b/ours/T / sst2" in again.stdout and "$ macsc" not in again.stdout


def test_slurm_writes_an_array_job_one_task_per_run(tmp_path):
    path = tmp_path / "table2.sbatch"
    result = run_table("--table", "2", "--slurm", path, "--max-parallel", "4")
    assert result.returncode == 0, result.stderr
    assert f"submit it from {ROOT} with:  sbatch {path}" in result.stdout
    text = path.read_text()
    for line in (
        "#SBATCH --array=0-59%4",  # 15 rows x 4 columns
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --ntasks-per-node=8",
        "#SBATCH --signal=SIGUSR1@90",
        "#SBATCH --requeue",
        "#SBATCH --time=02:00:00",
    ):
        assert line + "\n" in text
    assert text.count("    FIT=(fit ") == text.count("    VALIDATE=(validate ") == 60
    assert "  59)  # Table 2: xlnet-large/ours/T+I+A+V / squad_v2\n" in text
    assert 'srun "$MACSC" "${VALIDATE[@]}" --ckpt_path "$BEST"' in text
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0


def test_best_checkpoint_is_the_one_model_checkpoint_kept(tmp_path):
    folder = tmp_path / "version_0" / "checkpoints"
    folder.mkdir(parents=True)
    (folder / "last.ckpt").write_bytes(b"")
    assert run_table("--best-checkpoint", folder.parent).stdout.strip() == str(folder / "last.ckpt")
    (folder / "epoch=1-step=8.ckpt").write_bytes(b"")
    assert run_table("--best-checkpoint", folder.parent).stdout.strip() == str(
        folder / "epoch=1-step=8.ckpt"
    )


def test_every_launched_row_is_a_row_of_its_paper_table():
    spec = yaml.safe_load((ROOT / "scripts" / "table_rows.yaml").read_text())
    tables = {t["table"]: t for t in paper_results()["tables"]}
    for number, table in spec["tables"].items():
        ids = {name for r in tables[number]["rows"] for name in [r["id"], *r.get("aliases", [])]}
        for row in table["rows"]:
            assert row["row"] in ids, (number, row["row"])
        assert all(column in spec["columns"] for column in table["columns"])
        # every runnable row of the paper's table is launched (or says why not)
        assert {r["id"] for r in tables[number]["rows"]} <= {r["row"] for r in table["rows"]}


def print_config(argv: list[str], capsys) -> dict:
    """LightningCLI's own resolution of a printed command (``--print_config``)."""
    from macsc.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--print_config"])
    assert exit_info.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


def test_commongen_reads_its_batch_per_device_like_every_task(capsys):
    """SPEC 10: A.3's "32 on GLUE and CommonGen, 12 on SQuAD" are per-device sizes for every
    task, so CommonGen trains at 32 per device, 256 in all on its 8 GPUs, as GLUE does; the dry
    run says so, and LightningCLI resolves the same from the command the dry run prints."""
    out = run_table("--table", "3", "--dry-run").stdout
    settings, fit = out.split("# Table 3 t5-3b/no-msb/T+I+A+V / commongen\n")[1].splitlines()[:2]
    assert settings.startswith("# settings: batch 32 per device x 8 devices = 256 in all, lr 2e-5")
    config = print_config(shlex.split(fit)[1:], capsys)
    assert config["data"]["init_args"]["batch_size"] == 32
    assert config["trainer"]["devices"] == 8
    glue = run_table("--table", "1", "--dry-run").stdout.split(
        "# Table 1 bert-base/ours/T+I / sst2\n"
    )
    assert glue[1].startswith("# settings: batch 32 per device x 8 devices = 256 in all, lr 1e-4")


def fit_option(argv: list[str], option: str) -> str:
    return argv[argv.index(option) + 1]


def test_table_1_baselines_run_their_papers_grids(capsys):
    """SPEC 10: the +None rows train as their papers did, one run per point of the grid each
    paper chose from on dev: BERT lr 5e-5, 4e-5, 3e-5, 2e-5 at 32 in all (Devlin et al. §4.1);
    RoBERTa lr 1e-5, 2e-5, 3e-5 x batch 16, 32 in all, 10 epochs (Liu et al. Table 10)."""
    out = run_table("--table", "1", "--dry-run").stdout
    fits = [r for r in commands(out) if r[0] == "fit"]

    def points(row: str) -> list[list[str]]:
        name = "--trainer.logger.init_args.name"
        return [r for r in fits if fit_option(r, name).startswith(f"mrpc/{row}/")]

    bert = points("bert-base_none_T")
    assert [float(fit_option(r, "--model.optimizer.learning_rate")) for r in bert] == [
        5e-5,
        4e-5,
        3e-5,
        2e-5,
    ]
    assert all("lightning_configs/baselines/glue/bert_base.yaml" in r for r in bert)
    roberta = points("roberta-base_none_T")
    grid = {
        (
            float(fit_option(r, "--model.optimizer.learning_rate")),
            int(fit_option(r, "--data.init_args.batch_size")),
        )
        for r in roberta
    }
    assert len(roberta) == 6 and grid == set(itertools.product([1e-5, 2e-5, 3e-5], [2, 4]))
    # each point in its own folder, named after the point
    assert fit_option(roberta[0], "--trainer.default_root_dir") == (
        "runs/tables/mrpc/roberta-base_none_T/lr=1e-5,bs=2"
    )
    assert (
        "# grid of Table 1 bert-base/none/T: model.optimizer.learning_rate 5e-5, 4e-5, 3e-5, 2e-5 (4 runs a column;"
        in out
    )
    assert (
        "# Table 1 roberta-base/none/T / mrpc (grid point 1 of 6: lr=1e-5,bs=2)\n"
        "# settings: batch 2 per device x 8 devices = 16 in all, lr 1e-5 (adamw, warm-up 0.06 then "
        "linear decay), weight decay 0.1, 10 epochs\n"
    ) in out
    bert_point = (
        "# settings: batch 4 per device x 8 devices = 32 in all, lr 3e-5 (adamw, warm-up 0.1 then "
        "linear decay), weight decay 0.01, 3 epochs\n"
    )
    assert out.count(bert_point) == 6  # one a GLUE task
    # LightningCLI reads the point's options over the overlay's values
    config = print_config(roberta[-1], capsys)
    assert config["model"]["optimizer"]["learning_rate"] == 3e-5
    assert config["data"]["init_args"]["batch_size"] == 4


def test_bert_squad_baseline_takes_each_versions_own_settings(tmp_path):
    """Devlin et al. fine-tuned SQuAD v1.1 (§4.2: 32 in all, 3 epochs) and v2.0 (§4.3: 48 in
    all, 2 epochs) differently: an overlay given per base config picks each column's."""
    out = run_table("--table", "2", "--dry-run").stdout
    for column, overlay, settings in (
        ("squad_v1-5pct", "squad/bert_base_v1", "batch 4 per device x 8 devices = 32 in all"),
        ("squad_v1", "squad/bert_base_v1", "batch 4 per device x 8 devices = 32 in all"),
        ("squad_v2-5pct", "squad/bert_base_v2", "batch 6 per device x 8 devices = 48 in all"),
        ("squad_v2", "squad/bert_base_v2", "batch 6 per device x 8 devices = 48 in all"),
    ):
        block = out.split(f"# Table 2 bert-base/none/T / {column}\n")[1].splitlines()
        assert block[0].startswith(f"# settings: {settings}, lr 5e-5")
        assert f"lightning_configs/baselines/{overlay}.yaml" in block[1]
    rows = tmp_path / "rows.yaml"
    rows.write_text(
        yaml.safe_dump(
            {
                "columns": {"v2": {"base": "squad_v2.yaml"}},
                "tables": {
                    2: {
                        "title": "t",
                        "estimate": "e",
                        "time_limit": "01:00:00",
                        "columns": ["v2"],
                        "rows": [{"row": "a/none/T", "overlays": [{"squad_v1.yaml": "x.yaml"}]}],
                    }
                },
            }
        )
    )
    result = run_table("--rows", rows, "--table", "2", "--dry-run")
    assert result.returncode != 0
    assert (
        "row a/none/T: an overlay given per base config names none for squad_v2.yaml "
        "(it names squad_v1.yaml); add squad_v2.yaml: FILE"
    ) in result.stderr


def test_each_grid_point_is_a_run_that_resumes_on_its_own(tmp_path):
    rows = tmp_path / "rows.yaml"
    spec = {
        "columns": {"sst2": {"base": "glue_sst2.yaml"}},
        "tables": {
            1: {
                "title": "t",
                "estimate": "e",
                "time_limit": "01:00:00",
                "columns": ["sst2"],
                "rows": [
                    {
                        "row": "b/none/T",
                        "overlays": [],
                        "grid": {"model.optimizer.learning_rate": [1.0e-5, 2.0e-5]},
                    }
                ],
            }
        },
    }
    rows.write_text(yaml.safe_dump(spec))
    for point in ("lr=1e-5", "lr=2e-5"):
        done = tmp_path / "runs" / "sst2" / "b_none_T" / point / "validate.done"
        done.parent.mkdir(parents=True)
        done.touch()
    result = run_table("--rows", rows, "--table", "1", "--runs-dir", tmp_path / "runs")
    assert result.returncode == 0, result.stderr
    assert "done already b/none/T / sst2 lr=1e-5" in result.stdout
    assert "done already b/none/T / sst2 lr=2e-5" in result.stdout
    assert "$ macsc" not in result.stdout
    spec["tables"][1]["rows"][0]["grid"] = {"model.optimizer.learning_rate": []}
    rows.write_text(yaml.safe_dump(spec))
    result = run_table("--rows", rows, "--table", "1", "--dry-run")
    assert result.returncode != 0 and "row b/none/T: grid should map options to" in result.stderr
