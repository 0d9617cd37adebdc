"""int8 inputs that must be refused with a message naming what is missing (found by the unit
tests of issue 40: each passed, or failed with an unrelated error, before)."""

from __future__ import annotations

import re

import pytest
from test_export_precision_units import _head
from test_export_qdq_units import _conv_model
from test_qat_export_units import source
from torch import nn

from pgd_deploy import qat
from pgd_deploy.export import precision, qdq
from pgd_deploy.export.qat_export import fp32_reference_path


@pytest.mark.parametrize("target", ["tensorrt", "cpu"])
def test_a_qdq_node_without_a_zero_point_is_refused(target):
    """ONNX reads a missing zero point as uint8 0: neither target's rule allows it silently."""
    model = _conv_model()
    node = next(n for n in model.graph.node if n.name == "b_q_in")
    del node.input[2]
    with pytest.raises(ValueError, match=f"^b_q_in: the {target} int8 target needs an explicit"):
        qdq.check_int8_target(model, target)


def test_quantizing_without_calibration_images_says_so():
    with pytest.raises(ValueError, match="^int8 calibration: no calibration images were given$"):
        precision.quantize_int8(_head(), [])


def test_a_norm_named_neither_bn_nor_by_index_is_refused_with_its_name():
    parent = nn.Module()
    parent.conv = nn.Conv2d(3, 4, 1)
    parent.norm = nn.BatchNorm2d(4)
    with pytest.raises(ValueError, match=re.escape(".norm: no convolution to fold this norm")):
        qat.fold_batchnorm(parent)


def test_a_qat_checkpoint_without_its_init_says_it_was_not_recorded():
    with pytest.raises(ValueError, match=re.escape("fine-tuned from, (not recorded), which")):
        fp32_reference_path(source({"qat": {"version": 1}}))
