"""Calibration toolbox: block capture and forward (blockio), hooks on submodules (hooks), input statistics
(stats), scale folding (fold), the block-by-block driver (engine), whole-model observers (observe)."""
