"""modalign.finetune.pseudo: pseudo-labelling: the labeler registry entries, label propagation,
zero-shot and few-shot mixing, class-balanced selection, threshold policies, self-training and
the ``auto`` labeler that lets the few labels decide. The public names are exported by
:mod:`modalign.finetune`."""
