"""RTN that, for one bit width (env QRTEST_BLOCK_BITS), announces itself (touches QRTEST_MARKER) and then waits to
be killed: lets a test kill a sweep while a run is in flight, at a known point. Without the env it is RTN."""
import os
import time
from pathlib import Path

from methods.rtn import RTN


class BlockingRTN(RTN):
    def quantize(self, model, ctx):
        if os.environ.get("QRTEST_BLOCK_BITS") == str(self.spec.bits):
            Path(os.environ["QRTEST_MARKER"]).touch()
            time.sleep(120)  # the test kills the sweep long before this ends
        return super().quantize(model, ctx)
