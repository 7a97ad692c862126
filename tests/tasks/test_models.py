import numpy as np
import pytest
import torch
from PIL import Image

from deepvis.tasks.errors import UserError
from deepvis.tasks.models import imagenet_labels, imagenet_wnids, load_model
from deepvis.tasks.preprocess import preprocess


def test_labels_match_shared_tsv():
    from tests.conftest import CLASSES
    if not CLASSES.exists():
        pytest.skip("shared classes file missing")
    rows = [r.split("\t") for r in CLASSES.read_text().splitlines()[1:] if r.strip()]
    assert imagenet_labels() == [r[2] for r in rows]
    assert imagenet_wnids() == [r[1] for r in rows]


def test_offline_model_is_trained_espresso(lite0):
    """The bundled espresso photo must come out top-1 'espresso' (a random net would not)."""
    from skimage import data
    x = preprocess(Image.fromarray(data.coffee()), lite0.preprocessing)[None]
    with torch.no_grad():
        p = lite0.module(x).softmax(1)[0]
    top = int(p.argmax())
    assert lite0.labels[top] == "espresso"
    assert p[top] > 0.5
    assert lite0.preprocessing == {"resize": 256, "crop": 224, "mean": [0.5] * 3, "std": [0.5] * 3,
                                   "interpolation": "bilinear"}


def test_offline_model_on_real_sample(lite0, sample_dir):
    """Top-5 accuracy on 40 real ImageNet images is far above chance (trained weights, right preprocessing)."""
    wnids = imagenet_wnids()
    files = sorted(sample_dir.glob("*/*.JPEG"))[::20][:40]
    x = torch.stack([preprocess(Image.open(f), lite0.preprocessing) for f in files])
    with torch.no_grad():
        top5 = lite0.module(x).topk(5, dim=1).indices
    hits = sum(wnids.index(f.parent.name) in t.tolist() for f, t in zip(files, top5))
    assert hits / len(files) > 0.7


def test_model_in_eval_mode_and_frozen(lite0):
    assert not lite0.module.training
    assert not any(p.requires_grad for p in lite0.module.parameters())
    m, pre, labels = lite0  # unpacks as (module, preprocessing, labels)
    assert m is lite0.module and len(labels) == 1000


def test_torchvision_random_weights_offline():
    lm = load_model("torchvision:resnet18", weights="none")
    assert lm.labels is None and lm.preprocessing["crop"] == 224
    a = lm.module(torch.zeros(1, 3, 64, 64))
    b = load_model("torchvision:resnet18", weights="none").module(torch.zeros(1, 3, 64, 64))
    assert a.shape == (1, 1000) and torch.equal(a, b)  # random init is reproducible


def test_local_checkpoint_roundtrip(tmp_path):
    lm = load_model("torchvision:alexnet", weights="none")
    sd = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in lm.module.state_dict().items()}
    path = tmp_path / "ck.pt"
    torch.save(sd, path)
    lm2 = load_model("torchvision:alexnet", weights=str(path))
    assert torch.equal(lm2.module.state_dict()["features.0.weight"], sd["features.0.weight"])
    assert lm2.labels is not None and len(lm2.labels) == 1000


def test_checkpoint_with_pickled_code_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"x": np.dtype("float32").__class__}, path)  # not loadable with weights_only=True
    with pytest.raises(UserError, match="cannot read checkpoint"):
        load_model("torchvision:alexnet", weights=str(path))


@pytest.mark.parametrize("spec,weights,msg", [
    ("nonsense", None, "unknown model 'nonsense'"),
    ("torchvision:resnet999", "none", "unknown torchvision model 'resnet999'"),
    ("torchvision:resnet18", None, "offline, pass --weights none"),
    ("efficientnet_lite0", "/no/such/file.pt", "weights file not found"),
    ("no_such_pkg.mod:fn", None, "cannot import model"),
])
def test_bad_specs_clear_errors(spec, weights, msg, monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # no cached weights: forces the (failing) download
    with pytest.raises(UserError, match=msg.replace("(", r"\(")):
        load_model(spec, weights)


def test_user_callable_model(tmp_path, monkeypatch):
    (tmp_path / "mymodels.py").write_text(
        "import torch.nn as nn\n"
        "def tiny():\n"
        "    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    lm = load_model("mymodels:tiny")
    assert lm.source == "python" and lm.module(torch.zeros(1, 3, 32, 32)).shape == (1, 2)
