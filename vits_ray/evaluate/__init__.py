"""Objective evaluation of synthesised speech against reference recordings.

The names of what `vits-ray evaluate` writes live here, without the heavy imports of its modules,
so the report can find an evaluation without loading the signal processing.
"""

EVAL_JSON = "eval.json"  # aggregates, method, what was evaluated; written last
EVAL_CSV = "eval.csv"  # a row per utterance
SAMPLES_DIR = "samples"  # synthesised WAVs beside their references
RUN_EVAL_DIR = "eval"  # where an evaluation of a run goes, beside its checkpoints: the report looks there
