from digfast.training.dsm import TrainConfig, Trainer

__all__ = ["TrainConfig", "Trainer"]
