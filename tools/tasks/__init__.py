"""What runs on the engine (:mod:`tools.engine`): pre-training (:mod:`tools.tasks.pretrain`), classification
fine-tuning and voting (:mod:`tools.tasks.finetune`), few-shot folds (:mod:`tools.tasks.fewshot`), part
segmentation (:mod:`tools.tasks.segment`, metrics in :mod:`tools.tasks.seg_metrics`), the linear SVM
(:mod:`tools.tasks.svm`), pre-trained weight loading (:mod:`tools.tasks.pretrained`), the reporting statistics
(:mod:`tools.tasks.stats`) and the helpers the tasks share (:mod:`tools.tasks.common`). Nothing here imports
``tools.launch``."""
