"""The ``macsc`` command.

``macsc fit|validate|test|predict --config FILE`` is a LightningCLI over :class:`macsc.training.module.MaCSC`
and any data module of :mod:`tasks`; ``macsc prototypes --config FILE`` fills the prototype cache
ahead of training (and with ``--verify`` checks its files in full); ``macsc squad-eval ...`` is
the official-style SQuAD evaluation;
``macsc commongen-eval ...`` scores CommonGen sentences as the CommonGen leaderboard does;
``macsc report|overlap|weights ...`` read finished runs (:mod:`macsc.analysis.report`,
:mod:`macsc.analysis.overlap`, :mod:`macsc.analysis.weights`);
``macsc probe ...`` runs the zero-shot visual-reasoning probes of paper Table 7;
``macsc tiny-model ...`` writes a small random model offline (CommonGen's T5, a masked LM);
``macsc export RUN_OR_CKPT DIR`` writes a trained model to a folder with no pickle in it, and
``macsc infer DIR ...`` runs one on raw inputs (:mod:`macsc.inference`).
"""

from __future__ import annotations

import os
import sys

USAGE = """usage: macsc {fit,validate,test,predict} --config FILE [options]
       macsc prototypes --config FILE     fill the prototype cache ahead of training
       macsc prototypes [--config FILE | --cache_dir DIR] --verify
                                          check every cache file the config uses (or every file
                                          in the folder, default $MACSC_CACHE or ~/.cache/macsc)
                                          against its full checksum; exit status 1 if one is damaged
       macsc squad-eval DATA_JSON PRED_JSON [-n NA_PROB_JSON] [-t T] [-o FILE] [-p DIR] [-v]
                        [--missing-as-wrong] [--version 2.0|1.1]   the official SQuAD scores
       macsc commongen-eval REFERENCES PREDICTIONS [--tokenizer spacy|ptb]
                            BLEU-4, METEOR, ROUGE-L, CIDEr, coverage (JSON)
       macsc report RUN ... [--table N] [--out FILE.md] [--name RUN=ROW]   runs beside the paper's tables
       macsc overlap RUN ... [--split S] [--csv F] [--png F]   overlap of correct predictions (Figure 4)
       macsc weights RUN_OR_CKPT [--out DIR]   the modality weights rho and pi_z of a checkpoint
       macsc probe (--model NAME | --ckpt RUN.ckpt | --clip '{kind: open_clip, ...}')
                   [--memory-color F] [--color-terms F] [--object-shape F|DIR] [--json OUT]
       macsc tiny-model t5|bert-mlm|bert DIR [--hidden-size N]   a small random model, offline
                                          (CommonGen's T5, the probes' masked LM)
       macsc export RUN_OR_CKPT DIR [--config FILE] [--overwrite]
                                          a trained model as a folder to share: safetensors,
                                          config, tokenizer, macsc.json, model card
       macsc infer DIR (--text TEXT | --pair FIRST SECOND | --input FILE.jsonl) ... [--branches]
                                          an exported model on raw inputs, one JSON line each

Run `macsc fit --help` for every option, `macsc fit --config FILE --print_config` to see a
config resolved, `macsc probe --help` for the probes' options."""

#: the subcommands that are not LightningCLI's, by the module whose ``main(argv)`` runs them
#: (imported only when used, so ``macsc --help`` stays fast)
COMMANDS = {
    "prototypes": "macsc.cli.prototypes",
    "squad-eval": "macsc.cli.squad_eval",
    "commongen-eval": "macsc.cli.commongen_eval",
    "probe": "macsc.cli.probe",
    "report": "macsc.cli.report",
    "overlap": "macsc.cli.overlap",
    "weights": "macsc.cli.weights",
    "tiny-model": "macsc.cli.tiny_model",
    "export": "macsc.cli.export",
    "infer": "macsc.cli.infer",
}


def main(argv: list[str] | None = None) -> int:
    from_command_line = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("JSONARGPARSE_DEPRECATION_WARNINGS", "off")
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    from macsc.errors import MacscError

    try:
        if argv[0] in COMMANDS:
            from importlib import import_module

            status = int(import_module(COMMANDS[argv[0]]).main(argv[1:]) or 0)
            sys.stdout.flush()  # a closed pipe shows here, not at exit
            return status
        from macsc.cli.lightning import run_lightning

        # LightningCLI warns when given args while sys.argv has some too
        run_lightning(None if from_command_line else argv)
        return 0
    except BrokenPipeError:
        # the reader stopped reading (`macsc report --list-rows | head`): stop quietly, as a
        # shell tool does; what is still buffered goes nowhere instead of failing at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + 13  # the status of a process ended by SIGPIPE
    except MacscError as error:
        print(f"macsc: error: {error}", file=sys.stderr)
        return 2
    except Exception as error:
        from macsc.training.resume import lost_rank_message

        message = lost_rank_message(error)
        if message is None:
            raise
        print(f"macsc: error: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
