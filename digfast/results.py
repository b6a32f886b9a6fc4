"""What sample_batch returns: positions plus everything needed to reproduce and report them."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from digfast import io


@dataclass
class SampleResult:
    positions: torch.Tensor  # (n, N, d) float32 on the CPU, zero centre of mass
    system: object
    metadata: dict = field(default_factory=dict)
    mask: torch.Tensor | None = None  # (n, N) real atoms, None when all are real

    def __len__(self) -> int:
        return self.positions.shape[0]

    @property
    def samples_per_second(self) -> float:
        return self.metadata.get("samples_per_second", float("nan"))

    def energies(self) -> torch.Tensor:
        """The system's energy (kT units) of every sample."""
        return self.system.energy(self.positions)

    def to_mdtraj(self):
        return io.to_mdtraj(self.positions, self.system)

    def save(self, path, top: str | Path | None = None) -> list[Path]:
        """Write the ensemble; a trajectory format also writes its topology PDB. Returns the paths."""
        return io.save(path, self.positions, self.system, top=top, metadata=self.metadata)
