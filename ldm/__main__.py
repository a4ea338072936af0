"""`python -m ldm`: what the registry offers, without loading any weights.

    python -m ldm list-extractors [LIBRARY]        named entries, or every model of a library
    python -m ldm list-layers torchvision:resnet50 every layer name an @layer can take
    python -m ldm flags                            the command line's flags (docs/flags.md's table)
"""
import argparse
import sys

from ldm.choices import PAPER_ALIASES
from ldm.errors import InputError
from ldm.toy.names import TOY_ALIASES


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ldm", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    extractors = commands.add_parser("list-extractors", help="registry names")
    extractors.add_argument("library", nargs="?", help="torchvision, timm, open_clip or toy")
    layers = commands.add_parser("list-layers", help="the layer names of a model (built on the meta device)")
    layers.add_argument("extractor", help="library:model, e.g. torchvision:resnet50")
    commands.add_parser("flags", help="every flag of the scripts, as a markdown table")
    args = parser.parse_args(argv)
    if args.command == "flags":
        from ldm.cli.options import flags_markdown
        print(flags_markdown(), end="")
        return 0
    if args.command == "list-extractors" and args.library is None:   # without torch
        aliases = {**PAPER_ALIASES, **TOY_ALIASES}
        print("\n".join([*aliases, *aliases.values()]))
        return 0
    from ldm.extractors import list_extractors, list_layers   # a library's models need torch
    try:
        names = (list_extractors(args.library) if args.command == "list-extractors"
                 else list_layers(args.extractor))
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print("\n".join(names))
    return 0


if __name__ == "__main__":
    sys.exit(main())
