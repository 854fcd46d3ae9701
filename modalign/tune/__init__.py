"""``modalign tune``: Optuna search over fine-tuning or pretraining settings.

Data flow: :func:`~modalign.tune.study.run_tune` opens (or resumes) the study's SQLite storage in
the study folder (locked), builds the stage's objective (:mod:`.finetune_stage`: cached
embeddings of the training manifest, labels split into few-label train / validation;
:mod:`.pretrain_stage`: short pretraining runs pruned on validation recall), runs trials until the
budget (trials or wall time) is spent, and writes ``best.yaml``, ``trials.csv``/``trials.md`` and
``history.png``/``importances.png`` (:mod:`.outputs`).
"""
