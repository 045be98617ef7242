"""Learning: backbones and heads, fine-tuning, supervised training, mm-PT and MAML.

``models`` <- ``runtime`` (devices, evaluation, checkpoints) <- ``finetune``, ``supervised``,
``pretrain``, ``maml``.
"""
from .maml import MAML, MAMLConfig, train_maml
from .models import ModelConfig, build_backbone
from .pretrain import MultiTaskPretrainer, PretrainConfig
from .supervised import SupervisedConfig, train_supervised

__all__ = ["MAML", "MAMLConfig", "ModelConfig", "MultiTaskPretrainer", "PretrainConfig", "SupervisedConfig",
           "build_backbone", "train_maml", "train_supervised"]
