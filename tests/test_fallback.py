"""import digfast never fails for want of the compiled core; it says so once and runs on torch."""
import subprocess
import sys

SCRIPT = """
import logging, sys
logging.basicConfig(level=logging.WARNING, format="%(message)s")
sys.modules["digfast._C"] = None  # as if the extension were never built
import digfast
model = digfast.load("mixture")
out = digfast.sample_batch(model, n=6, steps=5, progress=False)
out = digfast.sample_batch(model, n=6, steps=5, progress=False)
print("backend", out.metadata["backend"], out.positions.shape[0])
"""


def test_missing_compiled_core_falls_back_with_one_warning():
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "backend reference 6" in proc.stdout
    assert proc.stderr.count("compiled core not available") == 1, proc.stderr
