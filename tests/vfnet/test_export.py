"""ONNX and torch.export programs against the PyTorch model: BCCD test images and crowded
synthetic scenes, raw head outputs and detections.

Each export costs about a minute on one core, so the tests share three: the tiny model exported by
`vfnet export` in both formats as a user would (detections compared), and the DCN model exported
with its raw head outputs appended (head outputs and detections compared; it has the star conv
too, so the head-output check covers both kinds of deformable layer); a narrow Res2Net-50 is
exported to torch.export only (its ceil-mode pools are what the trace has to get through).

Tolerances (float32): the exported star conv sums its products in another order than the
reference (gather + matmul instead of einsum), and onnxruntime's convolutions and matmuls use their
own kernels, so raw head outputs differ by float32 rounding accumulated over the network: we
require max |a - b| <= 1e-5 * max |b| per output. Detections are decoded from those outputs:
boxes = point -/+ exp(.) * distance, so a 1e-6 relative distance error is ~1e-4 px on a 100 px
box: we require 2e-3 px absolute; scores are sigmoids (slope <= 1/4): 1e-5 absolute. The number
of detections must be equal and the scores, in their order, within that tolerance; each detection
must have its own partner among the reference's (same label, box and score within tolerance):
two detections whose scores are equal up to rounding may come out in either order (the DCN
scene has a pair 1 ulp apart, swapped on one machine and not on another: the CPU's float32
kernels decide). A score within rounding of a threshold or of the
nms_pre-th score, or an NMS IoU within rounding of nms_iou, could still flip a decision; the
checked scenes have none.
"""
import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from vfnet.core.config import Config, apply_overrides
from vfnet.core.errors import ArgumentError
from vfnet.interop.export import MIN_SIDE, ExportableVFNet, export_onnx, export_program
from vfnet.interop.export.star_conv import star_deform_conv2d_pair_export
from vfnet.model import VFNet

BCCD = Path(__file__).resolve().parents[3] / "shared" / "data" / "bccd"
BCCD = BCCD if BCCD.is_dir() else Path("/work/shared/data/bccd")
HEAD_RTOL = 1e-5
BOX_ATOL = 2e-3  # px
SCORE_ATOL = 1e-5

pytestmark = pytest.mark.slow


def tiny_model(*overrides: str) -> VFNet:
    """R-18 VFNet with a narrow head, 3 classes, random weights whose class scores spread over
    (0, 1) (a trained model's do; the reference init puts them all below the threshold);
    `overrides` change its config (e.g. another backbone)."""
    cfg = apply_overrides(Config(), [
        "model.depth=18", "model.num_classes=3", "model.fpn_channels=16", "model.head_channels=16",
        "model.gn_groups=4", "model.stacked_convs=1", "model.kernels='torch'", "infer.nms_pre=100",
        "data.img_scale=[320, 240]", *overrides,
    ])
    torch.manual_seed(0)
    model = VFNet.from_config(cfg).eval()
    with torch.no_grad():
        torch.nn.init.normal_(model.head.cls.weight, std=0.5)
        model.head.cls.bias.fill_(-2.5)
    return model


def bccd_batch(count: int, size: tuple[int, int]) -> torch.Tensor:
    """`count` BCCD test images resized to size (w, h): float32 [B, 3, h, w] 0-255."""
    if not (BCCD / "annotations" / "test.json").is_file():
        pytest.skip(f"BCCD not found at {BCCD}")
    names = [im["file_name"] for im in json.loads((BCCD / "annotations" / "test.json").read_text())["images"]]
    arrays = [np.asarray(Image.open(BCCD / "images" / n).convert("RGB").resize(size, Image.BILINEAR))
              for n in names[:count]]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float()


def crowded_batch(count: int, size: tuple[int, int], seed: int = 0) -> torch.Tensor:
    """Synthetic crowded scenes: 150 small touching and overlapping discs and squares on noise."""
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(count):
        image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
        draw = ImageDraw.Draw(image)
        for _ in range(150):
            x, y = rng.integers(0, size[0]), rng.integers(0, size[1])
            r = int(rng.integers(4, 16))
            colour = tuple(int(c) for c in rng.integers(0, 256, 3))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x - r, y - r, x + r, y + r), fill=colour)
        images.append(np.asarray(image))
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float()


def reference(model: VFNet, images: torch.Tensor):
    """The PyTorch model on the same input: head outputs [B, P, .] and per-image detections."""
    from vfnet.model.losses import flatten_levels

    cfg = model.cfg
    mean = torch.tensor(cfg.data.mean).view(1, 3, 1, 1)
    std = torch.tensor(cfg.data.std).view(1, 3, 1, 1)
    b, _, h, w = images.shape
    d = cfg.data.size_divisor
    x = torch.nn.functional.pad((images - mean) / std, (0, -w % d, 0, -h % d))
    with torch.no_grad():
        outputs = model(x)
        detections = model.detections(outputs, torch.tensor([[h, w]] * b), torch.ones(b, 2))
    head = [flatten_levels(outputs.cls_scores), flatten_levels(outputs.bbox_init), flatten_levels(outputs.bbox_refine)]
    return head, detections


def unpaired(boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, reference: dict) -> list[int]:
    """Rows of one image's detections (boxes [n, 4], scores [n], labels [n]) left without a partner
    when each takes the first unused reference detection with its label, its box within BOX_ATOL
    and its score within SCORE_ATOL (a one-to-one pairing in score order)."""
    free = torch.ones(len(reference["scores"]), dtype=torch.bool)
    missing = []
    for row in range(len(scores)):
        fits = (free & (reference["labels"] == labels[row])
                & ((reference["scores"] - scores[row]).abs() <= SCORE_ATOL)
                & ((reference["boxes"] - boxes[row]).abs().amax(dim=1) <= BOX_ATOL))
        if fits.any():
            free[fits.nonzero()[0, 0]] = False
        else:
            missing.append(row)
    return missing


def check(outputs, head, detections, what: str) -> int:
    """Compare one run's outputs (boxes, scores, labels, num, and cls, init, refine where the
    export has its head outputs appended) with the reference; returns the number of detections
    checked."""
    assert len(outputs) in (4, 7), f"{what}: {len(outputs)} outputs"
    boxes, scores, labels, num = (torch.as_tensor(np.asarray(o)) for o in outputs[:4])
    for got, want, name in zip(outputs[4:], head, ("cls_logits", "bbox_init", "bbox_refine")):
        got = torch.as_tensor(np.asarray(got))
        assert got.shape == want.shape, f"{what} {name}"
        error = (got - want).abs().max().item() / want.abs().max().item()
        assert error <= HEAD_RTOL, f"{what} {name}: relative error {error:.2e}"
    total = 0
    for i, det in enumerate(detections):
        n = int(num[i])
        assert n == len(det["scores"]), f"{what} image {i}: {n} detections, PyTorch {len(det['scores'])}"
        torch.testing.assert_close(scores[i, :n], det["scores"], rtol=0, atol=SCORE_ATOL, msg=f"{what} image {i}")
        unmatched = unpaired(boxes[i, :n], scores[i, :n], labels[i, :n], det)
        assert not unmatched, f"{what} image {i}: detections {unmatched} have no partner in PyTorch's"
        # padding convention
        assert (labels[i, n:] == -1).all() and (scores[i, n:] == 0).all() and (boxes[i, n:] == 0).all()
        total += n
    return total


def test_pairing_accepts_tied_detections_in_either_order_and_nothing_else():
    reference = {"boxes": torch.tensor([[0.0, 0, 10, 10], [5, 5, 20, 20], [1, 1, 4, 4]]),
                 "scores": torch.tensor([0.5, 0.5, 0.3]), "labels": torch.tensor([1, 1, 2])}
    swapped = [1, 0, 2]
    got = (reference["boxes"][swapped], reference["scores"][swapped], reference["labels"][swapped])
    assert unpaired(*got, reference) == []
    moved = got[0].clone()
    moved[2, 0] += 3 * BOX_ATOL
    assert unpaired(moved, got[1], got[2], reference) == [2]
    assert unpaired(got[0], got[1], torch.tensor([1, 1, 0]), reference) == [2]
    assert unpaired(reference["boxes"][[0, 0, 2]], got[1], got[2], reference) == [1]  # one partner each


def test_the_wrapper_swaps_the_star_conv_of_a_copy_of_the_model(one_thread):
    """ExportableVFNet copies the model as built (its parts, weights and infer settings; nothing is
    rebuilt from a config, which here describes another model and only gives the normalisation and
    padding) and swaps the copy's star conv; the model keeps its own."""
    tiny = tiny_model()
    model = VFNet(tiny.backbone, tiny.neck, tiny.head, tiny.loss_fn, infer=tiny.infer, config=Config()).eval()
    star_pair = model.head.star_pair
    wrapper = ExportableVFNet(model, with_head=True)
    assert wrapper.model.head.star_pair is star_deform_conv2d_pair_export and model.head.star_pair is star_pair
    assert wrapper.model.head.cls.weight is not model.head.cls.weight
    assert wrapper.infer.nms_pre == 100  # the model's, not the config's 1000
    images = crowded_batch(2, (96, 64))
    head, detections = reference(model, images)
    with torch.no_grad():
        assert check(wrapper(images), head, detections, "eager wrapper") > 0
    with pytest.raises(ArgumentError, match="data config"):
        ExportableVFNet(VFNet(tiny.backbone, tiny.neck, tiny.head, tiny.loss_fn, infer=tiny.infer))


def test_the_onnx_export_leaves_out_the_skipped_rewrite_rules_and_only_during_the_export():
    """SlicesSplit is one of onnxscript's default rules (if a new onnxscript drops or renames it,
    this fails: re-measure the export and update SKIPPED_REWRITE_RULES); the export's block takes
    it out of the defaults and puts it back afterwards, error or not."""
    pytest.importorskip("onnxscript")
    from onnxscript import rewriter

    from vfnet.interop.export import SKIPPED_REWRITE_RULES, _without_rewrite_rules

    names = lambda: [rule.name for rule in rewriter._DEFAULT_REWRITE_RULES]  # noqa: E731
    before = names()
    assert set(SKIPPED_REWRITE_RULES) <= set(before)
    with pytest.raises(ValueError), _without_rewrite_rules(SKIPPED_REWRITE_RULES):
        assert names() == [name for name in before if name not in SKIPPED_REWRITE_RULES] and len(names()) > 10
        raise ValueError
    assert names() == before


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The tiny model saved as a checkpoint and exported by `vfnet export` to both formats at
    once (one trace), as a user would: the model, the loaded torch.export program, an onnxruntime
    session on the ONNX file, the files, and what the command printed."""
    pytest.importorskip("onnxruntime")
    import onnxruntime

    import vfnet.interop.export  # noqa: F401  (registers vfnet::non_max_suppression before the load)
    from vfnet.cli import main
    from vfnet.core.checkpoint import save_checkpoint

    model = tiny_model()
    out = tmp_path_factory.mktemp("export")
    checkpoint = save_checkpoint(out, model=model, optimizer=None, iteration=0, epoch=0, config=model.cfg)
    files = {"onnx": out / "model.onnx", "torch": out / "model.pt2"}
    with contextlib.redirect_stdout(io.StringIO()) as stdout:
        assert main(["export", "--checkpoint", str(checkpoint), "--out", *map(str, files.values())]) == 0
    printed = stdout.getvalue()
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    session = onnxruntime.InferenceSession(str(files["onnx"]), options, providers=["CPUExecutionProvider"])
    return model, torch.export.load(files["torch"]).module(), session, files, printed


SCENES = {
    "bccd_320x240_batch3": lambda: bccd_batch(3, (320, 240)),
    "bccd_200x150_batch1": lambda: bccd_batch(1, (200, 150)),
    "crowded_256x224_batch2": lambda: crowded_batch(2, (256, 224)),
}


@pytest.mark.parametrize("scene", list(SCENES))
def test_onnxruntime_and_torch_export_match_pytorch(exported, scene, one_thread):
    model, program, session, _, _ = exported
    images = SCENES[scene]()
    head, detections = reference(model, images)
    with torch.no_grad():
        n_torch = check(program(images), head, detections, f"torch.export {scene}")
    n_onnx = check(session.run(None, {"images": images.numpy()}), head, detections, f"onnxruntime {scene}")
    assert n_torch == n_onnx > 0


def test_crowded_scene_exercises_the_top_k_rule(exported, one_thread):
    """The crowded scene has levels with more than nms_pre passing pairs and full images
    (max_per_img detections), so the top-k and the cap are both tested above."""
    model, _, _, _, _ = exported
    images = crowded_batch(2, (256, 224))
    head, detections = reference(model, images)
    passing = (head[0].sigmoid() > model.cfg.infer.score_thr).sum(dim=(1, 2))
    assert (passing > model.cfg.infer.nms_pre).all()
    assert max(len(d["scores"]) for d in detections) > 10


def test_onnx_graph_uses_standard_operators(exported):
    import onnx

    _, _, session, files, _ = exported
    assert [i.name for i in session.get_inputs()] == ["images"]
    assert [o.name for o in session.get_outputs()][:4] == ["boxes", "scores", "labels", "num_detections"]
    ops = {(node.domain, node.op_type) for node in onnx.load(str(files["onnx"])).graph.node}
    assert {("", "NonMaxSuppression"), ("", "TopK"), ("", "Gather"), ("", "MatMul")} <= ops
    assert {domain for domain, _ in ops} <= {"", "ai.onnx"}, ops  # no custom or vendor operators


def test_small_images_run_in_onnxruntime(exported):
    """ONNX has no minimum size (torch.export programs need MIN_SIDE px per side)."""
    _, _, session, _, _ = exported
    boxes, scores, labels, num, *_ = session.run(None, {"images": crowded_batch(1, (MIN_SIDE - 40, 64)).numpy()})
    assert boxes.shape == (1, 100, 4) and num.shape == (1,) and 0 <= num[0] <= 100


def test_vfnet_export_command_writes_user_files(exported):
    """`vfnet export` of a checkpoint to both files (the fixture ran it): one line per written
    file, and the files give the detection outputs only (boxes, scores, labels, num_detections;
    their values are checked against PyTorch above)."""
    _, program, session, files, printed = exported
    assert printed.splitlines() == [f"wrote {path} ({fmt})" for fmt, path in files.items()]
    assert [o.name for o in session.get_outputs()] == ["boxes", "scores", "labels", "num_detections"]
    with torch.no_grad():
        assert len(program(crowded_batch(1, (256, 224)))) == 4


# --- DCN models: every DCNv2 layer (backbone stages, head towers) exported in standard operators ---


class TinyDCNBackbone(torch.nn.Module):
    """A narrow ResNeXt-style trunk built from the real DCN bottleneck blocks: stem (stride 4),
    then one grouped DCNv2 bottleneck per output (C3, C4, C5 at strides 8, 16, 32)."""

    def __init__(self, deform_conv):
        from vfnet.model.backbone import Bottleneck

        super().__init__()
        self.stem = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 7, 2, 3, bias=False), torch.nn.BatchNorm2d(16),
                                        torch.nn.ReLU(), torch.nn.MaxPool2d(3, 2, 1))
        blocks, in_channels = [], 16
        for channels in (8, 16, 32):
            downsample = torch.nn.Sequential(torch.nn.Conv2d(in_channels, channels * 4, 1, 2, bias=False),
                                             torch.nn.BatchNorm2d(channels * 4))
            blocks.append(Bottleneck(in_channels, channels, 2, downsample, groups=2, base_width=32,
                                     deform_conv=deform_conv))
            in_channels = channels * 4
        self.blocks = torch.nn.ModuleList(blocks)
        self.out_channels = [32, 64, 128]

    def forward(self, x):
        x = self.stem(x)
        outs = []
        for block in self.blocks:
            x = block(x)
            outs.append(x)
        return outs


def dcn_model() -> VFNet:
    """tiny_model's head with `dcn_on_last_conv` on a DCN backbone (`TinyDCNBackbone`); every DCN
    layer's offset conv random, so the samples fall between cells, up to a few cells away."""
    from kernels.reference import deform_conv2d_reference
    from vfnet.model.dcn import ModulatedDeformConv
    from vfnet.model.fpn import FPN

    cfg = apply_overrides(tiny_model().cfg, ["model.dcn_on_last_conv=true"])
    torch.manual_seed(0)
    head_model = VFNet.from_config(cfg)
    backbone = TinyDCNBackbone(deform_conv2d_reference)
    model = VFNet(backbone, FPN(backbone.out_channels, cfg.model.fpn_channels), head_model.head,
                  head_model.loss_fn, infer=cfg.infer, config=cfg).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        torch.nn.init.normal_(model.head.cls.weight, std=0.5, generator=gen)
        model.head.cls.bias.fill_(-2.5)
        for layer in model.modules():
            if isinstance(layer, ModulatedDeformConv):
                layer.conv_offset.weight.normal_(std=0.3 / layer.conv_offset.weight[0].numel() ** 0.5, generator=gen)
                layer.conv_offset.bias.uniform_(-1.5, 1.5, generator=gen)
    return model


def dcn_layers(model: torch.nn.Module) -> list:
    from vfnet.model.dcn import ModulatedDeformConv

    return [m for m in model.modules() if isinstance(m, ModulatedDeformConv)]


@pytest.mark.parametrize("overrides", [
    ["model.depth=50", "model.groups=4", "model.base_width=4"],
    ["model.backbone='res2net'", "model.depth=50"],
], ids=["resnext50_dcn", "res2net50_dcn"])
def test_the_wrapper_swaps_every_dcn_layer_of_a_zoo_architecture(overrides):
    """Backbone DCN stages (ResNeXt's conv2, Res2Net's split convs) and the head's
    dcn_on_last_conv: every DCNv2 layer of the copy runs deform_conv2d_export, the model keeps
    its op."""
    from vfnet.interop.export.deform_conv import deform_conv2d_export

    cfg = apply_overrides(Config(), overrides + [
        "model.stage_with_dcn=[false, true, true, true]", "model.dcn_on_last_conv=true", "model.kernels='torch'",
        "model.fpn_channels=16", "model.head_channels=16", "model.gn_groups=4", "model.stacked_convs=2"])
    model = VFNet.from_config(cfg)
    own = dcn_layers(model)
    copied = dcn_layers(ExportableVFNet(model).model)
    head = dcn_layers(model.head)
    assert len(head) == 2 and len(own) > len(head) and len(copied) == len(own)
    assert all(layer.deform_conv is deform_conv2d_export for layer in copied)
    assert all(layer.deform_conv is not deform_conv2d_export for layer in own)


@pytest.fixture(scope="module")
def exported_dcn(tmp_path_factory):
    """The DCN model's torch.export program and ONNX model, head outputs appended. The program is
    checked in memory: saving and loading a program is the tiny model's check above (`vfnet
    export` writes it, the fixture loads it), and loading this one would add ~55 s of torch's
    deserializer parsing symbolic strides (docs/export.md)."""
    pytest.importorskip("onnxruntime")
    import onnxruntime

    import vfnet.interop.export  # noqa: F401  (registers vfnet::non_max_suppression before the load)

    model = dcn_model()
    out = tmp_path_factory.mktemp("export_dcn")
    program = export_program(model, with_head=True)
    onnx_file = export_onnx(model, out / "dcn.onnx", program=program)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    session = onnxruntime.InferenceSession(str(onnx_file), options, providers=["CPUExecutionProvider"])
    return model, program.module(), session, onnx_file


def test_dcn_model_exports_to_standard_onnx_operators_and_matches_pytorch(exported_dcn, one_thread):
    import onnx

    model, program, session, onnx_file = exported_dcn
    assert len(dcn_layers(model)) == 5  # C3, C4, C5 and both head towers
    ops = {(node.domain, node.op_type) for node in onnx.load(str(onnx_file)).graph.node}
    assert {domain for domain, _ in ops} <= {"", "ai.onnx"}, ops  # no custom or vendor operators
    images = crowded_batch(2, (256, 224))
    head, detections = reference(model, images)
    with torch.no_grad():
        n_torch = check(program(images), head, detections, "torch.export DCN")
    n_onnx = check(session.run(None, {"images": images.numpy()}), head, detections, "onnxruntime DCN")
    assert n_torch == n_onnx > 0
    # a small image (P7 of one cell, through the head's DCN layers) still runs in onnxruntime
    small = crowded_batch(1, (MIN_SIDE - 40, 64))
    head, detections = reference(model, small)
    check(session.run(None, {"images": small.numpy()}), head, detections, "onnxruntime DCN small")


def test_res2net_exports_with_dynamic_sizes(one_thread):
    """Res2Net v1d's avg-down shortcuts pool in ceil mode: torch.export has to see that the padded
    input is a multiple of 32 (every pooled side even) or it rejects the trace. A narrow-width
    Res2Net-50 (the full block structure, 2 scales of width 4) exported once with dynamic sizes,
    then run on sides that are and are not multiples of 32: head outputs and detections as PyTorch."""
    model = tiny_model("model.backbone='res2net'", "model.depth=50", "model.base_width=4", "model.scales=2")
    program = export_program(model, with_head=True).module()
    for size in ((256, 224), (MIN_SIDE + 2, 161)):
        images = crowded_batch(1, size, seed=size[0])
        head, detections = reference(model, images)
        with torch.no_grad():
            assert check(program(images), head, detections, f"Res2Net {size}") > 0
