import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

import vfnet
from tiny_run import make_data, records, run_vfnet, vfnet_command, write_config
from vfnet.cli import main
from vfnet.core.config import CONFIG_DIR, DEFAULT_CONFIG_NAME, config_name, load_config, shipped_configs
from vfnet.model import VFNet

BCCD = Path(__file__).resolve().parents[3] / "shared" / "data" / "bccd"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("shapes"))


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    """A 2-iteration `vfnet train` run: (config file, work dir)."""
    root = tmp_path_factory.mktemp("trained")
    config = write_config(root / "tiny.toml", data, max_iters=2)
    assert main(["train", "--config", str(config), "--workdir", str(root / "wd")]) == 0
    return config, root / "wd"


def _bad(capsys, argv, *needles):
    """Run `vfnet argv`: exit 2, one `vfnet: error:` line naming every needle, no traceback."""
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("vfnet: error:")]
    assert len(lines) == 1, err
    for needle in needles:
        assert str(needle) in lines[0], lines[0]
    return lines[0]


def test_train_prints_table_and_writes_workdir(trained, capsys):
    config, workdir = trained
    assert (workdir / "config.toml").is_file() and (workdir / "eval.json").is_file()
    assert (workdir / "checkpoints" / "last.pt").is_file()
    assert [r["iter"] for r in records(workdir)] == [1, 2]
    # re-running a finished run resumes at its end: no training, evaluates and prints again
    assert main(["train", "--config", str(config), "--workdir", str(workdir)]) == 0
    out = capsys.readouterr().out
    assert out.count("Average Precision") == 6 and out.count("Average Recall") == 6
    assert [r["iter"] for r in records(workdir)] == [1, 2]


def test_default_workdir_is_named_after_config(data, tmp_path, monkeypatch):
    config = write_config(tmp_path / "mini.toml", data, max_iters=1)
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--config", str(config)]) == 0
    assert (tmp_path / "work_dirs" / "mini" / "checkpoints" / "last.pt").is_file()


def test_eval_checkpoint_on_default_and_given_sets(trained, data, tmp_path, capsys):
    _, workdir = trained
    ckpt = workdir / "checkpoints" / "last.pt"
    assert main(["eval", "--checkpoint", str(ckpt), "--out", str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out
    assert len([line for line in out.splitlines() if "maxDets" in line]) == 12
    default = json.loads((tmp_path / "a" / "eval.json").read_text())
    assert default == json.loads((workdir / "eval.json").read_text())  # same model, same val set
    assert main(["eval", "--checkpoint", str(ckpt), "--ann", str(data / "annotations" / "train.json"),
                 "--images", str(data / "images" / "train"), "--out", str(tmp_path / "b")]) == 0
    assert "bbox_mAP" in json.loads((tmp_path / "b" / "eval.json").read_text())


def test_predict_draws_pngs_and_writes_results(trained, data, tmp_path, capsys):
    _, workdir = trained
    images = sorted((data / "images" / "val").glob("*.png"))
    gray = tmp_path / "gray.jpg"
    Image.open(images[0]).convert("L").save(gray)  # any mode and format PIL reads
    out = tmp_path / "pred"
    assert main(["predict", "--checkpoint", str(workdir / "checkpoints" / "last.pt"), "--out", str(out),
                 "--score-thr", "0", str(images[0]), str(gray)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["000001.png", "gray.png", "results.json"]
    drawn = Image.open(out / "000001.png")
    assert drawn.size == Image.open(images[0]).size
    assert drawn.tobytes() != Image.open(images[0]).convert("RGB").tobytes()  # boxes were drawn
    results = json.loads((out / "results.json").read_text())
    assert results and {r["image_id"] for r in results} <= {1, 2}
    assert {r["category_id"] for r in results} <= {1, 2, 3, 4}
    assert all(len(r["bbox"]) == 4 and 0 <= r["score"] <= 1 for r in results)


def test_data_commands(tmp_path):
    assert main(["data", "synth", "--out", str(tmp_path / "s"), "--images", "4", "--size", "64"]) == 0
    assert json.loads((tmp_path / "s" / "annotations" / "val.json").read_text())["images"]
    assert main(["data", "pack", "--ann", str(tmp_path / "s" / "annotations" / "train.json"),
                 "--images", str(tmp_path / "s" / "images" / "train"), "--out", str(tmp_path / "pq")]) == 0
    assert list((tmp_path / "pq").glob("*.parquet"))
    if not BCCD.is_dir():
        pytest.skip(f"{BCCD} not present")
    out = tmp_path / "bccd_test.json"
    assert main(["data", "convert", "--voc", str(BCCD / "voc_xml"), "--images", str(BCCD / "images"),
                 "--split", str(BCCD / "splits" / "test.txt"), "--out", str(out)]) == 0
    assert len(json.loads(out.read_text())["images"]) == 72


def test_config_is_a_file_or_a_shipped_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # not the source tree: the shipped configs come with the package
    assert CONFIG_DIR.parent == Path(vfnet.__file__).parent
    assert shipped_configs() == sorted(p.stem for p in CONFIG_DIR.glob("*.toml"))
    assert {"bccd_r18", "bccd_r50_coco_finetune", "coco_r50_1x", "shapes_tiny",
            "vfnet_x101-64x4d-mdconv-c3-c5_fpn_ms-2x_coco"} <= set(shipped_configs())
    shipped = load_config(CONFIG_DIR / "bccd_r18.toml")
    assert load_config("bccd_r18") == load_config("bccd_r18.toml") == shipped
    assert load_config(None) == load_config(DEFAULT_CONFIG_NAME) == load_config(CONFIG_DIR / "shapes_tiny.toml")
    (tmp_path / "bccd_r18.toml").write_text("[train]\nlr = 0.5\n")
    assert load_config("bccd_r18.toml").train.lr == 0.5  # a file wins over a shipped name
    assert load_config("bccd_r18").train.lr == shipped.train.lr
    assert config_name(None) == "shapes_tiny"
    assert config_name("bccd_r18") == config_name("a/bccd_r18.toml") == "bccd_r18"


# ---------------------------------------------------------------------------------------------
# Bad input: one line on stderr naming the culprit, exit status 2, nothing written lost


def test_missing_config_file(capsys, tmp_path):
    _bad(capsys, ["train", "--config", str(tmp_path / "nope.toml")], "nope.toml")
    _bad(capsys, ["train", "--config", "nope"], "config file not found: nope (nor a shipped config: bccd_r18, ")


def test_unknown_config_key_and_wrong_type(trained, capsys, tmp_path):
    config, _ = trained
    wd = str(tmp_path / "wd")
    _bad(capsys, ["train", "--config", str(config), "--workdir", wd, "--set", "train.bogus=1"], "train.bogus")
    _bad(capsys, ["train", "--config", str(config), "--workdir", wd, "--set", "train.batch_size=abc"],
         "train.batch_size", "abc")
    _bad(capsys, ["train", "--config", str(config), "--workdir", wd, "--set", "train.lr=[1]"], "train.lr")
    bad_toml = tmp_path / "bad.toml"
    bad_toml.write_text("[train]\nunknown_key = 3\n")
    _bad(capsys, ["train", "--config", str(bad_toml), "--workdir", wd], "bad.toml", "train.unknown_key")
    assert not (tmp_path / "wd").exists()


def _copy_data(data: Path, dst: Path) -> Path:
    shutil.copytree(data, dst)
    return dst


def test_missing_and_corrupt_annotation_files(data, capsys, tmp_path):
    copy = _copy_data(data, tmp_path / "d")
    config = write_config(tmp_path / "c.toml", copy, max_iters=1)
    ann = copy / "annotations" / "train.json"
    ann.unlink()
    _bad(capsys, ["train", "--config", str(config), "--workdir", str(tmp_path / "wd")], ann)
    ann.write_text('{"images": [')
    _bad(capsys, ["train", "--config", str(config), "--workdir", str(tmp_path / "wd")], ann, "JSON")


def test_unknown_category_id(data, capsys, tmp_path):
    copy = _copy_data(data, tmp_path / "d")
    ann = copy / "annotations" / "train.json"
    coco = json.loads(ann.read_text())
    coco["annotations"][0]["category_id"] = 99
    ann.write_text(json.dumps(coco))
    config = write_config(tmp_path / "c.toml", copy, max_iters=1)
    _bad(capsys, ["train", "--config", str(config), "--workdir", str(tmp_path / "wd")], ann, "99")


def test_missing_and_unreadable_images(data, capsys, tmp_path):
    copy = _copy_data(data, tmp_path / "d")
    config = write_config(tmp_path / "c.toml", copy, max_iters=4)
    image = copy / "images" / "train" / "000003.png"
    image.unlink()
    _bad(capsys, ["train", "--config", str(config), "--workdir", str(tmp_path / "wd")], image)
    image.write_bytes(b"\x89PNG\r\n\x1a\n garbage")  # found at construction, fails when read
    _bad(capsys, ["train", "--config", str(config), "--workdir", str(tmp_path / "wd")], image)
    _bad(capsys, ["predict", "--checkpoint", "x.pt", "--out", str(tmp_path / "p"), str(tmp_path / "no.png")],
         "no.png")


def test_missing_and_truncated_checkpoints(trained, capsys, tmp_path):
    _, workdir = trained
    _bad(capsys, ["eval", "--checkpoint", str(tmp_path / "missing.pt")], "missing.pt")
    data = (workdir / "checkpoints" / "last.pt").read_bytes()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(data[: len(data) // 3])
    _bad(capsys, ["eval", "--checkpoint", str(truncated)], "truncated.pt")
    _bad(capsys, ["predict", "--checkpoint", str(truncated), "--out", str(tmp_path / "p"),
                  str(next((workdir.parent).glob("*.toml")))], "truncated.pt")
    # a truncated last.pt in a work dir: `vfnet train` refuses to resume from it, names it
    wd = tmp_path / "wd"
    (wd / "checkpoints").mkdir(parents=True)
    (wd / "checkpoints" / "last.pt").write_bytes(data[:100])
    config, _ = trained
    _bad(capsys, ["train", "--config", str(config), "--workdir", str(wd)], wd / "checkpoints" / "last.pt")
    assert (wd / "checkpoints" / "last.pt").read_bytes() == data[:100]  # left for the user to inspect


def test_non_finite_loss_exits_2_and_keeps_checkpoint(data, capsys, tmp_path, monkeypatch):
    config = write_config(tmp_path / "c.toml", data, max_iters=4)
    original = VFNet.loss
    calls = {"n": 0}

    def nan_at_3(self, *args):
        losses = original(self, *args)
        calls["n"] += 1
        if calls["n"] == 3:
            losses["loss_cls"] = torch.full_like(losses["loss_cls"], float("inf"))
        return losses

    monkeypatch.setattr(VFNet, "loss", nan_at_3)
    _bad(capsys, ["train", "--config", str(config), "--workdir", str(tmp_path / "wd")], "iteration 3")
    assert torch.load(tmp_path / "wd" / "checkpoints" / "last.pt", weights_only=True)["iteration"] == 2


def test_console_script_subprocess_bad_input_and_help(tmp_path):
    if "vfnet.cli" in " ".join(vfnet_command()):
        pytest.skip("the vfnet console script is not installed (pip install -e .)")
    done = run_vfnet("train", "--config", str(tmp_path / "absent.toml"), timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [f"vfnet: error: config file not found: {tmp_path / 'absent.toml'}"]
    done = run_vfnet("--help", timeout=120)
    assert done.returncode == 0 and "train" in done.stdout and "predict" in done.stdout
