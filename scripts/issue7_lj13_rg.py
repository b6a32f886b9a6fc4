"""LJ-13 radius-of-gyration guidance with a narrow q (std 0.02): noisy predictor vs Tweedie.

    OMP_NUM_THREADS=1 python scripts/issue7_lj13_rg.py   # writes bench/issue7/lj13_rg_std002.json
"""
import json, digfast
from digfast.guidance import Guidance, radius_of_gyration as rg
from digfast.property_model import train_property_model
m = digfast.load("lj13"); s = m.system
noisy = train_property_model(m, "rg", s.reference_data(), steps=1500, progress=None)
rows = []
for label, g in (("unguided", None),
                 ("noisy predictor, std 0.02", Guidance(noisy, target=1.05, std=0.02)),
                 ("tweedie, std 0.02, weight signal", Guidance(rg, target=1.05, std=0.02, denoise=True, weight="signal"))):
    out = digfast.sample_batch(m, n=300, steps=50, sampler="dpm++2m", progress=False, guidance=g)
    v = rg(out.positions.double()); e = out.energies().double()
    rows.append({"run": label, "mean": float(v.mean()), "std": float(v.std()), "energy_median": float(e.median()),
                 "q05": float(e.quantile(0.05)), "q95": float(e.quantile(0.95)), "n_nonfinite": out.metadata.get("n_nonfinite")})
    print(rows[-1], flush=True)
json.dump(rows, open("bench/issue7/lj13_rg_std002.json", "w"), indent=1)
