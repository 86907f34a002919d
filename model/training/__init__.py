"""Training: the entry points (``train.pretrain``, ``train.finetune``), one phase's loop, the
losses, the loaders, class weights, checkpoints and their compatibility rules, and the speed
switches (``precision``)."""
