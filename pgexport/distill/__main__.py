"""`python -m pgexport.distill ARGS` = `pgexport distill ARGS`, for launchers that take a module:
`accelerate launch -m pgexport.distill ...`, `torchrun --nproc_per_node N -m pgexport.distill ...`."""

import sys

from pgexport.cli import main

main(["distill", *sys.argv[1:]], prog_name="pgexport")
