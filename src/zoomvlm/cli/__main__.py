import sys

from zoomvlm.cli.main import main

sys.exit(main())
