"""`mergegate btm ...`: Branch-Train-Merge operations on a data dir, in-process (no server needed)."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from app.settings import Settings
from experts.btm.operations import BTM, ModelSize
from experts.btm.pipeline import run_pipeline
from experts.btm.protocol import BATCH_SPLITS, BRANCH_FROM, DEV_SEQUENCES
from experts.data.corpora import SPLITS
from experts.runtime import open_repository
from experts.training.config import TrainConfig


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("btm", help="Branch-Train-Merge from the command line: pipeline, branch, train (in-process)")
    ops = p.add_subparsers(dest="op", required=True, metavar="OP")

    def common(q: argparse.ArgumentParser) -> None:
        q.add_argument("--data-dir", type=Path, help="data directory (default ./data; env MERGEGATE_DATA_DIR)")

    def budget(q: argparse.ArgumentParser) -> None:  # TrainConfig's fields, with its defaults
        q.add_argument("--tokens", type=int, help="token budget (TrainConfig.max_tokens)")
        q.add_argument("--seconds", type=float, help="time budget (TrainConfig.max_seconds)")
        q.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
        q.add_argument("--seq-len", type=int, default=TrainConfig.seq_len)
        q.add_argument("--seed", type=int, default=TrainConfig.seed)

    q = ops.add_parser("pipeline", help="seed -> branch -> train for every domain -> forest (+ average)")
    common(q), budget(q)
    q.add_argument("--prefix", required=True)
    q.add_argument("--domains", required=True, help="comma-separated corpus names")
    q.add_argument("--seed-fraction", type=float, default=0.5)
    q.add_argument("--branch-from", choices=BRANCH_FROM, default="seed",
                   help="seed: every expert resumes the seed (the paper); posterior: sequential branching")
    q.add_argument("--batch-split", choices=BATCH_SPLITS, default="paper",
                   help="paper: the dense second half's updates at 1/n of the batch; full: full batch, 1/n of them")
    q.add_argument("--prior-corpus", help="target data for the forest's cached prior (default: uniform)")
    q.add_argument("--prior-split", choices=SPLITS, default="validation")
    q.add_argument("--prior-sequences", type=int, default=DEV_SEQUENCES)
    q.add_argument("--layers", type=int, default=4)
    q.add_argument("--embd", type=int, default=256)
    q.add_argument("--vocab", type=int, default=4096)
    q = ops.add_parser("train", help="continue training an expert on one domain")
    common(q), budget(q)
    q.add_argument("--id", required=True)
    q.add_argument("--source", required=True)
    q.add_argument("--domain", required=True)
    q.add_argument("--resume", action="store_true", help="resume the source's optimizer state and schedule")
    q = ops.add_parser("branch", help="a new expert from a weighted average of experts")
    common(q)
    q.add_argument("--id", required=True)
    q.add_argument("--parents", required=True, help="comma-separated expert ids")
    q.add_argument("--domain", help="new domain (default weights: the parents' posterior on it)")
    q.add_argument("--weights", help="comma-separated explicit weights")
    q.add_argument("--prior-split", choices=SPLITS, default="validation", help="dev data for the default weights")
    q.add_argument("--prior-sequences", type=int, default=DEV_SEQUENCES)
    p.set_defaults(fn=run)


def run(args: argparse.Namespace) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    settings = Settings(**({"data_dir": args.data_dir} if args.data_dir else {}))
    repo = open_repository(settings.data_dir, database_url=settings.db_url, max_loaded_models=8,
                           max_loaded_bytes=settings.max_loaded_bytes)
    btm = BTM(repo, settings.data_dir, settings.corpus_bytes)

    def show(f: float, msg: str) -> None:
        print(f"  {f * 100:5.1f}% {msg}", flush=True)

    try:
        if args.op == "branch":
            weights = [float(w) for w in args.weights.split(",")] if args.weights else None
            out = btm.branch(args.id, args.parents.split(","), args.domain, weights, prior_split=args.prior_split,
                             prior_sequences=args.prior_sequences).to_dict()
        else:
            if args.tokens is None and args.seconds is None:
                raise SystemExit("give --tokens or --seconds")
            budget = TrainConfig(max_tokens=args.tokens, max_seconds=args.seconds, batch_size=args.batch_size,
                                 seq_len=args.seq_len, seed=args.seed)
            if args.op == "train":
                out = btm.train(args.id, args.source, args.domain, budget, progress=show,
                                resume=args.resume).to_dict()
            else:
                size = ModelSize(args.layers, args.embd, max(1, args.embd // 64), 256, args.vocab)
                out = run_pipeline(btm, args.prefix, args.domains.split(","), budget, size=size,
                                   seed_fraction=args.seed_fraction, branch_from=args.branch_from,
                                   batch_split=args.batch_split, progress=show,
                                   prior={"corpus": args.prior_corpus, "split": args.prior_split,
                                          "sequences": args.prior_sequences} if args.prior_corpus else None)
        print(json.dumps(out, indent=2, default=str))
    finally:
        repo.close()
