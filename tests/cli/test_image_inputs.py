"""`query --image` and `activations` decode through storage.images (issue #18: one decoder): a
decompression bomb is a one-line error, exit 2, never a traceback (issue #17 item 8)."""
from __future__ import annotations

import pytest

from deepvis.cli import main
from tests.atlas_viewer.conftest import make_synthetic_atlas
from tests.bombs import png


@pytest.mark.parametrize("w,h,pixels", [(20000, 20000, False),    # PIL's own bomb error: was a traceback
                                        (400000, 100, True)])     # 39 KB, was decoded in full
def test_query_image_bomb_is_one_line(tmp_path, capsys, w, h, pixels):
    facts = make_synthetic_atlas(tmp_path / "atlas", big_units=2)
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png(w, h, pixels))
    assert main(["query", str(facts["root"]), "--image", str(bomb)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("deepvis query: error: cannot read image") and "too large" in err, err
    assert (f"{w}x{h}" in err or f"{w * h} pixels" in err) and "\n" not in err


def test_activations_bomb_is_one_line(tmp_path, capsys):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png(20000, 20000, pixels=False))
    assert main(["activations", str(bomb), "--model", "efficientnet_lite0", "--layer", "_blocks.3",
                 "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("deepvis activations: error: cannot read") and "too large" in err and "\n" not in err
    assert not list((tmp_path / "out").glob("*.png"))
