"""The layer summary: bits, memory and MACs per layer."""

import timm

import irconvert


def test_summary_counts_bits_and_macs():
    b = irconvert.binarize(timm.create_model("resnet18"))
    s = irconvert.summary(b)
    row = {r.name: r for r in s.rows}
    assert row["layer1.0.conv1"].binary == "W1A1" and row["conv1"].binary == "fp32"
    # 64 out channels x ceil(576/32)=18 words x 4 bytes + 64 int8 exponents
    assert row["layer1.0.conv1"].bytes == 64 * 18 * 4 + 64
    assert row["layer1.0.conv1"].macs == 56 * 56 * 64 * 576
    assert 0.9 < s.binary_mac_share < 1 and s.compression > 10
    assert "compression" in str(s)
