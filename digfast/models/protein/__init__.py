"""DiG protein score model: the public checkpoint layout (reference) and the fast path."""
from digfast.models.protein.checkpoint import CheckpointError, load_official_protein
from digfast.models.protein.config import ProteinConfig
from digfast.models.protein.model import ProteinScoreModel

__all__ = ["ProteinConfig", "ProteinScoreModel", "load_official_protein", "CheckpointError"]
