"""Tina: a text-conditioned diffusion transformer that generates personalized classifier heads from class names.

    gen = train_tina(zoo_entries, encoder, TinaConfig())        # once
    heads = gen.generate([["maple tree", "oak tree", "tractor"]])  # any user, no training
    save_checkpoint(path, gen); gen = load_checkpoint(path, encoder)
"""

from fedtina.tina.diffusion import DDIMSampler, DDPMSampler, NoiseSchedule, training_loss
from fedtina.tina.generator import TinaGenerator, parse_label_text
from fedtina.tina.layout import GlobalSegment, ParamLayout
from fedtina.tina.model import TinaNet
from fedtina.tina.train import TinaTrainer, load_checkpoint, save_checkpoint, train_tina

__all__ = [
    "DDIMSampler", "DDPMSampler", "GlobalSegment", "NoiseSchedule", "ParamLayout", "TinaGenerator", "TinaNet",
    "TinaTrainer", "load_checkpoint", "parse_label_text", "save_checkpoint", "train_tina", "training_loss",
]
