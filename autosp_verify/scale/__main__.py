import sys

from autosp_verify.scale.cli import main

sys.exit(main())
