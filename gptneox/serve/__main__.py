import sys

from .. import cli
from .server import build_parser, main

sys.exit(cli.run(main, build_parser()))
