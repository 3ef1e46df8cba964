"""hardbatch: train on the examples that matter.

The public surface lives here; everything under `hardbatch.sampler`, `hardbatch.trainer` and
`hardbatch.services` is the implementation.
"""

__version__ = "0.1.0"
