"""`python -m softmoe.bench.layer [...]`, the same as `softmoe bench layer [...]`."""
import sys

from softmoe.bench.layer.command import main

sys.exit(main())
