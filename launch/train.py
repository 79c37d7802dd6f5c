"""Train GAFH-RIDN: parse, load the config, run the library's Trainer.

Exit codes: 0 done (or stopped by a signal after saving); 2 config / data-root / weights error, found
before any model is built (one line on stderr, rank 0); 3 aborted after train.max_nan_skips
non-finite steps in a row.

    deepspeed launch/train.py --config configs/gafh_ridn_paper.yaml data.root=/data/celeba
    torchrun --nproc_per_node 8 launch/train.py --config ... ; python launch/train.py --config ...
"""
import argparse
import logging
import os
import sys

from gafh_fast.config import ConfigError, load_config
from gafh_fast.train import Trainer, TrainingAborted
from gafh_fast.train.preflight import EXIT_USAGE, UsageError


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML config, e.g. configs/demo.yaml")
    parser.add_argument("--run-dir", default=None, help="output directory (default: runs/<config name>)")
    parser.add_argument("--resume", default="auto", help="auto (newest complete checkpoint in the run dir) | none | PATH")
    parser.add_argument("--override", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("overrides", nargs="*", metavar="SECTION.KEY=VALUE", help="e.g. data.root=/data train.max_steps=1000")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    args = parser.parse_intermixed_args()

    rank0 = os.environ.get("RANK", "0") == "0"
    logging.basicConfig(level=logging.INFO if rank0 else logging.WARNING, format="%(asctime)s %(levelname)s %(message)s")
    try:
        cfg = load_config(args.config, args.overrides + args.override)
        Trainer(cfg, args.run_dir or os.path.join("runs", cfg.name), resume=args.resume).fit()
    except (ConfigError, UsageError) as e:  # found before anything was built: one line, rank 0 only
        if rank0:
            print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except TrainingAborted as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
