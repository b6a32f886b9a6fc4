from digfast.models.graphormer3d import Graphormer3D, Graphormer3DConfig

__all__ = ["Graphormer3D", "Graphormer3DConfig"]
