"""The numeric-format interface (the entries of quant/formats.py FORMATS) and the qparams records it produces.

A format maps real values to unsigned integer codes (uint8, < 2^code_bits) given per-group qparams and back.
encode / decode are elementwise with broadcasting qparams, so the same code quantizes a group tensor
[rows, n_groups, g], one GPTQ column [out] or an activation row. Range formats (int, fp8, fp4, MX, NV, NF4) get
their qparams from each group's (clipped) min / max; fitted formats (k-means, binary, ternary) fit them to the
group's values (`fit`, optionally weighted). `prepare_layer` fixes what a whole tensor shares before its groups are
fitted: the second-level scale of two-level scales (quant/scales.py) or a per-layer codebook.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..errors import ConfigError
from .scales import SCALE2_BITS, ScaleCoding, code_scales, level2_of

if TYPE_CHECKING:
    from .spec import QuantSpec

LUT_BITS = 16  # codebook entries are stored as fp16


@dataclass
class QParams:
    """Per-group parameters: scale, zero [rows, n_groups] float32; lut [rows | 1, n_groups | 1, K] for codebooks."""

    scale: torch.Tensor
    zero: torch.Tensor
    lut: torch.Tensor | None = None


@dataclass
class LayerParams:
    """What a whole tensor shares: second-level scale [rows | 1, 1] and/or a per-layer codebook [1, 1, K]."""

    scale2: torch.Tensor | None = None
    lut: torch.Tensor | None = None


class NumericFormat:
    """Base: a name, the bit widths it allows, and the math. Subclasses override the methods below."""

    name = "base"
    bits_allowed: tuple[int, ...] = ()
    sym_only = False  # scaling is symmetric by construction (a spec asking for asym is made sym)
    ct_type: str | None = None  # compressed-tensors QuantizationArgs.type, None = not expressible
    int_codes = False  # codes are two's-complement-offset integers usable by integer kernels
    fitted = False  # qparams are fitted to the values (fit), not derived from a min / max range
    act_ok = False  # usable for dynamic activation quantization (range formats with float scales)
    default_scales = ScaleCoding()  # scale storage when the spec does not ask for one (scale_bits=None)
    fixed_scales = False  # the format defines its scale storage (MX, NV): scale_bits must be None or its bits
    group_required: int | None = None  # the format's block size (MX 32, NV 16); other group sizes are refused

    def validate(self, spec: "QuantSpec") -> None:
        if spec.bits not in self.bits_allowed:
            allowed = ", ".join(map(str, self.bits_allowed))
            raise ConfigError(f"bits={spec.bits} does not fit qformat={self.name}; allowed: {allowed}"
                              f"{' (or 16 for no quantization)' if self.int_codes else ''}")
        g = self.group_required
        if g is not None and (spec.granularity != "group" or spec.group_size != g):
            got = spec.group_size if spec.granularity == "group" else spec.granularity
            raise ConfigError(f"qformat={self.name} has a fixed block of {g} values per scale; got group_size={got}; "
                              f"allowed: group_size={g}")
        self.scale_coding(spec)

    def scale_coding(self, spec: "QuantSpec") -> ScaleCoding:
        """How group scales are stored: the format's default, or integer two-level scales (spec.scale_bits)."""
        sb = spec.scale_bits
        if sb is None or (self.fixed_scales and sb == self.default_scales.bits):
            return self.default_scales
        if self.fixed_scales:
            raise ConfigError(f"qformat={self.name} stores {self.default_scales.bits}-bit {self.default_scales.kind} "
                              f"scales; got scale_bits={sb}; allowed: null or {self.default_scales.bits}")
        if sb == 16:
            return ScaleCoding()
        if not 2 <= sb <= 8:
            raise ConfigError(f"scale_bits={sb} is out of range; allowed: null (format default), 16 (float), 2..8 "
                              f"(integer scales against a per-{spec.scale_level2} float)")
        return ScaleCoding("uint", sb, spec.scale_level2)

    def code_bits(self, spec: "QuantSpec") -> int:
        """Bits one stored code takes."""
        return spec.bits

    def n_codes(self, spec: "QuantSpec") -> int:
        """Codes the encoder can produce (2^code_bits unless some are unused, e.g. ternary)."""
        return 2 ** self.code_bits(spec)

    def scale_bits(self, spec: "QuantSpec") -> int:
        """Bits one stored group scale takes (0: none stored)."""
        return self.scale_coding(spec).bits

    def zero_bits(self, spec: "QuantSpec") -> int:
        """Bits one stored zero point takes (0: none stored)."""
        return 0

    def scale2_bits(self) -> int:
        """Bits of one second-level scale."""
        return SCALE2_BITS

    def lut_bits(self) -> int:
        """Bits of one codebook entry."""
        return LUT_BITS

    def sym_zero(self, spec: "QuantSpec") -> float:
        """Zero point implied when none is stored (symmetric)."""
        return 0.0

    def half_levels(self, spec: "QuantSpec") -> int:
        """Positive quantization steps of a symmetric range (what clipping searches trade off)."""
        raise NotImplementedError

    def qparams(self, xmin: torch.Tensor, xmax: torch.Tensor, spec: "QuantSpec", scale2: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, zero) per group from a (possibly clipped) range; float32, same shape as xmin. With `scale2`,
        the scale is the nearest one its two-level coding can store."""
        raise NotImplementedError

    def encode(self, x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: "QuantSpec") -> torch.Tensor:
        """uint8 codes of x (qparams broadcast against x). Codebook formats take lut= as well."""
        raise NotImplementedError

    def decode(self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: "QuantSpec") -> torch.Tensor:
        """float32 values of codes."""
        raise NotImplementedError

    def saturated(self, x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: "QuantSpec") -> torch.Tensor:
        """bool: x lies beyond the grid's range (its error exceeds rounding: it was clamped)."""
        raise NotImplementedError

    def levels(self, spec: "QuantSpec") -> torch.Tensor:
        """Every code decoded at scale 1 and the implied zero: [n_codes] float32 (for tests and tables)."""
        codes = torch.arange(self.n_codes(spec), dtype=torch.int32).to(torch.uint8)
        one = torch.ones(())
        return self.decode(codes, one, torch.full((), self.sym_zero(spec)), spec)

    def _qparams_coded(self, xmin, xmax, spec, scale2):
        kw = {} if scale2 is None else {"scale2": scale2}
        return self.qparams(xmin, xmax, spec, **kw)

    def prepare_layer(self, xg: torch.Tensor, spec: "QuantSpec", weight: torch.Tensor | None = None) -> LayerParams:
        """Shared state of a tensor's groups xg [rows, n_groups, g]: the second-level scale from the raw group
        scales (min-max of each group), or nothing."""
        coding = self.scale_coding(spec)
        if coding.level2 is None:
            return LayerParams()
        raw, _ = self.qparams(xg.amin(dim=-1), xg.amax(dim=-1), spec)  # [rows, n_groups] float scales
        return LayerParams(scale2=level2_of(raw, coding))

    def fit(self, xg: torch.Tensor, spec: "QuantSpec", weight: torch.Tensor | None = None,
            layer: LayerParams | None = None) -> QParams:
        """qparams of groups xg [rows, n_groups, g] (weight: per-value importance broadcast to xg, 0 = ignore;
        range formats ignore it). Without `layer`, what the tensor shares is computed from xg itself."""
        layer = self.prepare_layer(xg, spec, weight) if layer is None else layer
        return QParams(*self._qparams_coded(xg.amin(dim=-1), xg.amax(dim=-1), spec, layer.scale2))

    def coded_scale(self, raw: torch.Tensor, spec: "QuantSpec", scale2: torch.Tensor | None) -> torch.Tensor:
        """The stored effective scale nearest to a raw float scale (identity for float scales)."""
        c = self.scale_coding(spec)
        if not c.coded or (c.level2 is not None and scale2 is None):  # raw request (prepare_layer)
            return raw.float()
        return code_scales(raw, scale2, c)
