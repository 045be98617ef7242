"""Peak memory of the pixel search's gradient-boosting candidate, against the estimate that
decides whether the search fits it (``medmeta.learning.pixels.hgb_bytes``).

Each case fits the candidate (``pixels.candidates``' own settings, 3 iterations: the peak is
reached in the first) on random float32 pixels of ``samples`` x ``features`` in a fresh process
with one thread, and reads the kernel's high-water mark (VmHWM) from before the fit. Labels are
random (trees stop early), or learnable from the pixels (trees grow all their leaves: the most
histograms at once), with 2 or 11 classes. The estimate must stay above every measured peak
(the tests check the saved output): a search that starts a fit it cannot hold is killed for
memory (adrenal at 64³ was, at 25.0 GB).

    python benchmarks/hgb_memory.py > docs/results/benchmarks/hgb_memory.txt    # about 10 minutes
"""
from __future__ import annotations

import os
import subprocess
import sys

CASES = [(1188, 10_000, "random"), (4752, 10_000, "random"), (9504, 10_000, "random"), (1188, 40_000, "random"),
         (1188, 10_000, "learnable"), (9504, 10_000, "learnable"), (19_008, 2_500, "learnable"),
         (4752, 5_000, "11 classes")]


def measure(samples: int, features: int, labels: str) -> int:
    """Bytes the fit adds to the process's peak resident memory."""
    import numpy as np
    from sklearn.base import clone

    from memory import reset_peak, status_mib
    from medmeta.learning.pixels import candidates

    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (samples, features), dtype=np.uint8).astype(np.float32) / 255.0
    signal = (x[:, :64] > 0.5).sum(axis=1)  # many features matter: trees keep splitting
    y = {"random": rng.integers(0, 2, samples), "learnable": signal > 32,
         "11 classes": np.digitize(signal, np.quantile(signal, np.linspace(0, 1, 12)[1:-1]))}[labels]
    before = status_mib("VmRSS")
    reset_peak()
    clone(candidates(0)["hgb"]).set_params(max_iter=3).fit(x, y)
    return int((status_mib("VmHWM") - before) * 2**20)


def main() -> None:
    if len(sys.argv) == 4:  # one case, in its own process
        print(measure(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]))
        return
    import sklearn

    from medmeta.learning.pixels import hgb_bytes

    print(f"scikit-learn {sklearn.__version__}, one thread; GB = 1e9 bytes")
    print(f"{'samples':>8} {'features':>9} {'labels':>11} {'measured GB':>12} {'estimate GB':>12} "
          f"{'estimate/measured':>18}")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for samples, features, labels in CASES:
        out = subprocess.run([sys.executable, __file__, str(samples), str(features), labels], env=env, check=True,
                             capture_output=True, text=True).stdout
        measured, estimate = int(out.split()[-1]), hgb_bytes(samples, features)
        print(f"{samples:>8,} {features:>9,} {labels:>11} {measured / 1e9:>12.3f} {estimate / 1e9:>12.3f} "
              f"{estimate / measured:>18.2f}", flush=True)


if __name__ == "__main__":
    main()
