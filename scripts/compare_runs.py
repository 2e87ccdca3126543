"""Compare two output folders of the same demo (e.g. before and after a refactor): numbers, weights, shards.

    python scripts/compare_runs.py OLD_DIR NEW_DIR

- every number of ``report/metrics.json``, wall-clock fields skipped (latency, wall time, machine, paths
  that name the folder itself are reported but expected to differ);
- every ``.safetensors`` weight file under the folders, tensor by tensor (bit for bit: same code, same
  machine; the file bytes may differ by safetensors' metadata order);
- every ``.npy`` shard, byte for byte.
Exits 1 when anything but folder paths differs.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

SKIP = ("latency", "wall", "seconds", "machine", "elapsed")


def number_diffs(a, b, path: str = "") -> list[str]:
    """Differences between two JSON values, wall-clock keys skipped."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            if any(s in k for s in SKIP):
                continue
            if k not in a or k not in b:
                out.append(f"{path}/{k}: only in {'new' if k in b else 'old'}")
            else:
                out += number_diffs(a[k], b[k], f"{path}/{k}")
        return out
    if isinstance(a, list) and isinstance(b, list):
        out = [f"{path}: length {len(a)} vs {len(b)}"] if len(a) != len(b) else []
        return out + [d for i, (x, y) in enumerate(zip(a, b)) for d in number_diffs(x, y, f"{path}[{i}]")]
    if isinstance(a, float) and isinstance(b, float) and (a == b or (math.isnan(a) and math.isnan(b))):
        return []
    return [] if a == b else [f"{path}: {a!r} vs {b!r}"]


def main(old: Path, new: Path) -> int:
    import torch
    from safetensors.torch import load_file
    bad = 0
    diffs = number_diffs(json.loads((old / "report" / "metrics.json").read_text()),
                         json.loads((new / "report" / "metrics.json").read_text()))
    paths = [d for d in diffs if str(old) in d and str(new) in d]
    print(f"metrics.json: {len(diffs) - len(paths)} differences ({len(paths)} folder paths)")
    for d in diffs:
        print("  " + d)
    bad += len(diffs) - len(paths)
    weights = sorted(p.relative_to(old) for p in old.rglob("*.safetensors"))
    wdiff = []
    for f in weights:
        if not (new / f).exists():
            wdiff.append(f"{f}: missing")
            continue
        x, y = load_file(str(old / f)), load_file(str(new / f))
        if x.keys() != y.keys() or any(not torch.equal(x[k], y[k]) for k in x):
            wdiff.append(str(f))
    print(f"weight files: {len(weights)} compared, {len(wdiff)} differ {wdiff[:5]}")
    shards = sorted(p.relative_to(old) for p in old.rglob("*.npy"))
    sdiff = [str(f) for f in shards if not (new / f).exists() or (old / f).read_bytes() != (new / f).read_bytes()]
    print(f"shards: {len(shards)} compared, {len(sdiff)} differ {sdiff[:5]}")
    return 1 if bad or wdiff or sdiff else 0


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    sys.exit(main(Path(sys.argv[1]), Path(sys.argv[2])))
