"""Packing layouts: exact round trips, exact storage size, and bit-compatibility with compressed-tensors."""
import pytest
import torch

from qresearch.quant.packing import pack_rows, pack_zeros, packed_words, unpack_rows, unpack_zeros


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("cols", [1, 7, 31, 32, 33, 64, 172, 200])
def test_pack_roundtrip_exact(bits, cols):
    g = torch.Generator().manual_seed(bits * 1000 + cols)
    codes = torch.randint(0, 2**bits, (6, cols), generator=g, dtype=torch.uint8)
    codes[0] = 2**bits - 1  # all-ones row exercises the sign bit of the int32 words
    packed = pack_rows(codes, bits)
    assert packed.dtype == torch.int32 and packed.shape == (6, packed_words(cols, bits))
    assert packed.shape[1] * 32 < (cols * bits) + 32  # dense: at most one partly-filled word per row
    assert torch.equal(unpack_rows(packed, bits, cols), codes)


def test_pack_layout_is_little_endian_stream():
    codes = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8, 9]], dtype=torch.uint8)
    packed = pack_rows(codes, 4)
    assert packed.tolist() == [[0x87654321, 9]] or packed.tolist() == [[0x87654321 - 2**32, 9]]
    three = pack_rows(torch.tensor([[7] * 11], dtype=torch.uint8), 3)  # code 10 straddles words 0 and 1
    assert three.shape == (1, 2) and (int(three[0, 0]) & 0xFFFFFFFF) == 0xFFFFFFFF and int(three[0, 1]) == 1


def test_pack_rejects_bad_input():
    with pytest.raises(AssertionError):
        pack_rows(torch.tensor([[16]], dtype=torch.uint8), 4)
    with pytest.raises(ValueError):
        pack_rows(torch.zeros(1, 4, dtype=torch.uint8), 9)  # 1..8 bits are packable (1: binary weights)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_zero_points_roundtrip(bits):
    z = torch.randint(0, 2**bits, (9, 5)).float()
    assert pack_zeros(z, bits).shape == (-(-9 * bits // 32), 5)
    assert torch.equal(unpack_zeros(pack_zeros(z, bits), bits, 9), z)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_matches_compressed_tensors_pack(bits):
    helpers = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    codes = torch.randint(0, 2**bits, (4, 172), dtype=torch.uint8)
    signed = (codes.to(torch.int16) - 2 ** (bits - 1)).to(torch.int8)
    assert torch.equal(helpers.pack_to_int32(signed, bits), pack_rows(codes, bits))
