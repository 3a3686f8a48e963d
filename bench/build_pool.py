"""Build the demo LoRA pool (>= 20 adapters on one base) into a MergeGate data directory.

    python bench/build_pool.py --data-dir data                # full: 4x256 base (~4 min) + 20 adapters x 25 s
    python bench/build_pool.py --data-dir /tmp/pool --quick   # CI: tiny base, a few seconds per adapter

Resumable: adapters already registered are kept. Then serve the data dir (`mergegate serve --data-dir ...`)
and open merge sessions with `{"base": "pool-base", "pool": {"tags": ["pool"]}}`.
See experts/pool.py for the slices and the held-out target tasks.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# OpenMP threads that spin while waiting stall badly when another process holds a core (measured: a
# forward 2-10x slower with 2 threads on a busy 2-core box); passive waiting keeps 2 threads useful.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", type=Path, required=True)
    p.add_argument("--n", type=int, default=20, help="number of adapters (default 20)")
    p.add_argument("--base", help="an existing local expert as the base (default: train <prefix>-base)")
    p.add_argument("--prefix", default="pool")
    p.add_argument("--quick", action="store_true", help="tiny base, a few seconds per adapter")
    p.add_argument("--seconds-per-adapter", type=float)
    p.add_argument("--base-seconds", type=float, help="time budget of the base (when it is trained)")
    p.add_argument("--threads", type=int, help="torch threads (1 is faster on a busy machine)")
    args = p.parse_args(argv)
    import torch

    from experts.evo.pool import build_pool

    if args.threads:
        torch.set_num_threads(args.threads)
    result = build_pool(args.data_dir, args.n, base=args.base, quick=args.quick, prefix=args.prefix,
                        seconds_per_adapter=args.seconds_per_adapter, base_seconds=args.base_seconds)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
