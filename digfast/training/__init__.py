from digfast.training.dsm import TrainConfig, Trainer, TrainingDiverged

__all__ = ["TrainConfig", "Trainer", "TrainingDiverged"]
