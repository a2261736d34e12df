"""Evaluation of pretrained backbones (SFRIK paper, section 5 protocols).

Commands (``sfrik_scale.eval.cli``): ``linear-eval`` and ``finetune`` (`classifier`),
``knn-eval`` (`knn`), ``svm-eval`` (`svm`, VOC07), ``report`` (`report`); online evaluation
during pretraining (`online.OnlineEvaluator`). Modules:

- `source`: where the weights come from (run directory, export, random initialisation);
- `data`, `subsets`, `multilabel`: labelled splits, label-fraction subsets, multi-label lists;
- `features`: sharded frozen-feature extraction with a cache;
- `common`, `session`: topology, detached collectives, results, progress, shared set-up.

Heavy imports stay inside the modules: importing this package is cheap.
"""
