"""DiG protein sampling: IGSO(3) tables, frames and backbones, the public sampler and its
faster options, inputs (AlphaFold2 representations) and outputs (PDB, XTC)."""
