"""Knowledge distillation: a PaliGemma teacher into a smaller PaliGemma student that exports
through the same pipeline (`pgexport distill`, `pgexport.distill.train.distill`).

    student.py  student config and init from teacher layers (every k-th, or a given map)
    loss.py     temperature-scaled KL on suffix tokens * T^2 + cross-entropy, optional hidden-state term
    data.py     training rows: a JSONL split, or the demo task generated on the fly
    train.py    `distill`: the loop under Hugging Face accelerate (DDP/FSDP via `accelerate launch`)
    report.py   exact match, parameter counts, latency -> report.json / report.md
    cli.py      the `pgexport distill` command

Kept free of heavy imports so that `pgexport --help` stays fast.
"""

import sys
import types


class _CallablePackage(types.ModuleType):
    """`pgexport.distill(...)` runs the distillation: importing this package binds it as the
    attribute `pgexport.distill`, which would otherwise shadow the function of that name."""

    def __call__(self, *args, **kwargs):
        from pgexport.distill.train import distill

        return distill(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
