"""digfast: fast sampling and likelihoods for Distributional Graphormer (DiG) diffusion models."""
from digfast.api import load, log_likelihood, sample_batch
from digfast.guidance import Guidance
from digfast.results import SampleResult
from digfast.schedules import CosineVP, GeometricVE, LinearVP, SigmoidVP, make_schedule

__version__ = "0.1.0"

__all__ = ["load", "sample_batch", "log_likelihood", "SampleResult", "LinearVP", "CosineVP",
           "SigmoidVP", "GeometricVE", "make_schedule", "Guidance", "__version__"]
