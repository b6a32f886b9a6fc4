"""digfast: fast sampling and likelihoods for Distributional Graphormer (DiG) diffusion models."""
from digfast.api import load, load_official_protein, log_likelihood, sample_batch, sample_with_likelihood
from digfast.guidance import Guidance
from digfast.paths import reaction_path
from digfast.results import SampleResult
from digfast.schedules import CosineVP, GeometricVE, LinearVP, SigmoidVP, make_schedule

__version__ = "0.1.0"

__all__ = ["load", "load_official_protein", "sample_batch", "log_likelihood", "sample_with_likelihood",
           "SampleResult", "LinearVP", "CosineVP",
           "SigmoidVP", "GeometricVE", "make_schedule", "Guidance", "reaction_path", "__version__"]
