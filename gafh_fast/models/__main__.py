"""Print the parameter counts of G and D for a config: `python -m gafh_fast.models [CONFIG] [key=value ...]`."""
import sys

from gafh_fast.config import load_config
from gafh_fast.models import build_discriminator, build_generator, count_parameters


def main(argv: list[str]) -> None:
    path = argv[0] if argv and "=" not in argv[0] else None
    overrides = argv[1:] if path else argv
    cfg = load_config(path, overrides)
    print(f"config: {path or '<defaults>'}")
    print(f"generator G:     {count_parameters(build_generator(cfg)):>12,d} parameters")
    print(f"discriminator D: {count_parameters(build_discriminator(cfg)):>12,d} parameters")


if __name__ == "__main__":
    main(sys.argv[1:])
