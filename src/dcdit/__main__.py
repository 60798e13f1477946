import sys

from dcdit.cli import main

if __name__ == "__main__":
    sys.exit(main())
