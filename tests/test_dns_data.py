"""DNS real-feature loaders: the official CMCL HDF5 cache (read as the official code writes it) and free modality
names in .npz data. Tiny generated files; h5py is an optional extra, so its tests skip without it."""

import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402

NAMES = ["rain", "dog", "crow"]  # unsorted on purpose: the label index is the position in the sorted names
D = 8


def write_h5(path, rows):
    """One root dataset per key, as CMCL's perceptors/base.py writes them."""
    h5py = pytest.importorskip("h5py")
    with h5py.File(path, "w") as f:
        for key, value in rows.items():
            f.create_dataset(key, data=value)


def make_cache(tmp_path, backbone, ds="esc50", text_noise=1e-6, seed=0):
    """Write `{ds}_{split}_{backbone}.h5` + `{ds}_class_{backbone}.h5` in the official layout and the equivalent
    `{ds}_{split}.npz` files (rows in sorted-key order) under tmp_path/h5 and tmp_path/npz."""
    rng = np.random.default_rng(seed)
    mods = data.DNS_DATASETS[ds][0]
    protos = {name: 100.0 * rng.standard_normal(D).astype(np.float32) for name in NAMES}  # text scale 100
    (tmp_path / "h5").mkdir()
    (tmp_path / "npz").mkdir()
    for split, n in (("train", 12), ("test", 7)):
        rows, names = {}, {}
        for i in range(n):
            k = int(rng.integers(len(NAMES)))
            sample_id = f"{(i * 7919) % 1000:03d}-{split}.wav"  # insertion order is not the sorted order
            key = f"{sample_id}__{NAMES[k]}__tensor({k})" if backbone == "imagebind" else sample_id
            x = rng.standard_normal((len(mods), D)).astype(np.float32)
            if "text" in mods:  # the text row is the class name's embedding (up to round-off)
                x[mods.index("text")] = protos[NAMES[k]] * (1 + text_noise * rng.standard_normal(D))
            rows[key], names[key] = x, NAMES[k]
        write_h5(tmp_path / "h5" / f"{ds}_{split}_{backbone}.h5", rows)
        keys = sorted(rows)
        arrays = {m: np.stack([rows[key][j] for key in keys]) for j, m in enumerate(mods)}
        if ds in data.DNS_H5_LABELLED:
            arrays.update(label=np.array([sorted(NAMES).index(names[key]) for key in keys]),
                          class_names=np.array(sorted(NAMES)), class_text=np.stack([protos[c] for c in sorted(NAMES)]))
        np.savez(tmp_path / "npz" / f"{ds}_{split}.npz", **arrays)
    write_h5(tmp_path / "h5" / f"{ds}_class_{backbone}.h5", protos)


def assert_same(got, want):
    for ds in want:
        for split in ("train", "test"):
            g, w = got[ds][split], want[ds][split]
            assert list(g["feats"]) == list(w["feats"])
            for m in w["feats"]:
                np.testing.assert_array_equal(g["feats"][m], w["feats"][m])
            for k in ("label", "class_text"):
                assert (g[k] is None) == (w[k] is None)
                if w[k] is not None:
                    np.testing.assert_array_equal(g[k], w[k])


@pytest.mark.parametrize("backbone", sorted(data.DNS_BACKBONE_DIM))
def test_official_h5_cache_equals_the_equivalent_npz(backbone, tmp_path):
    make_cache(tmp_path, backbone)
    steps = [("esc50", "text", "audio")]
    got = data.load_dns_features(str(tmp_path / "h5"), steps, backbone)
    assert_same(got, data.load_dns_features(str(tmp_path / "npz"), steps))
    assert got["esc50"]["train"]["label"].dtype == np.int64 and got["esc50"]["test"]["class_text"].shape == (3, D)
    # a {ds}_{split}.npz next to the cache wins
    z = dict(np.load(tmp_path / "npz" / "esc50_train.npz"))
    np.savez(tmp_path / "h5" / "esc50_train.npz", **dict(z, audio=2 * z["audio"]))
    mixed = data.load_dns_features(str(tmp_path / "h5"), steps, backbone)
    audio = got["esc50"]["train"]["feats"]["audio"]
    np.testing.assert_array_equal(mixed["esc50"]["train"]["feats"]["audio"], 2 * audio)


def test_three_modality_dataset_rows_follow_the_global_order_and_nyudv2_has_no_labels(tmp_path):
    make_cache(tmp_path, "unibind", ds="vggsound_s")
    got = data.load_dns_features(str(tmp_path / "h5"), [("vggsound_s", "audio", "video")], "unibind")
    assert list(got["vggsound_s"]["train"]["feats"]) == ["text", "audio", "video"]
    assert_same(got, data.load_dns_features(str(tmp_path / "npz"), [("vggsound_s", "audio", "video")]))
    ny = tmp_path / "ny"
    ny.mkdir()
    make_cache(ny, "imagebind", ds="nyudv2")
    os.remove(ny / "h5" / "nyudv2_class_imagebind.h5")  # not needed: nyudv2 labels are skipped
    got = data.load_dns_features(str(ny / "h5"), [("nyudv2", "vision", "depth")], "imagebind")
    assert list(got["nyudv2"]["test"]["feats"]) == ["vision", "text", "depth"]
    assert got["nyudv2"]["test"]["label"] is None and got["nyudv2"]["test"]["class_text"] is None
    assert_same(got, data.load_dns_features(str(ny / "npz"), [("nyudv2", "vision", "depth")]))


def test_labels_fall_back_to_the_imagebind_key_else_a_clear_error(tmp_path):
    make_cache(tmp_path, "imagebind", text_noise=0.1)  # text rows no longer equal a prototype
    steps = [("esc50", "text", "audio")]
    assert_same(data.load_dns_features(str(tmp_path / "h5"), steps, "imagebind"),
                data.load_dns_features(str(tmp_path / "npz"), steps))
    bare = tmp_path / "bare"
    bare.mkdir()
    make_cache(bare, "languagebind", text_noise=0.1)  # bare ids: nothing to fall back on
    with pytest.raises(data.DataError, match="esc50_train_languagebind.h5: cannot recover labels") as e:
        data.load_dns_features(str(bare / "h5"), steps, "languagebind")
    assert "esc50_class_languagebind.h5" in str(e.value)
    os.remove(bare / "h5" / "esc50_class_languagebind.h5")
    with pytest.raises(data.DataError, match="esc50_class_languagebind.h5: file not found"):
        data.load_dns_features(str(bare / "h5"), steps, "languagebind")


def test_bad_official_files_are_rejected_naming_the_file(tmp_path):
    rng = np.random.default_rng(0)
    write_h5(tmp_path / "clotho_train_imagebind.h5", {"a": rng.standard_normal((3, D))})  # clotho has 2 rows
    with pytest.raises(data.DataError, match=r"clotho_train_imagebind.h5: samples have shape \[3, 8\], expected \[2"):
        data.load_dns_features(str(tmp_path), [("clotho", "text", "audio")], "imagebind")
    write_h5(tmp_path / "llvip_train_unibind.h5", {"ok": rng.standard_normal((2, D)), "dir/x": np.zeros((2, D))})
    with pytest.raises(data.DataError, match=r"llvip_train_unibind.h5: group key\(s\) \['dir'\]"):
        data.load_dns_features(str(tmp_path), [("llvip", "vision", "thermal")], "unibind")
    write_h5(tmp_path / "toy_train_imagebind.h5", {"a": rng.standard_normal((2, D))})
    with pytest.raises(data.DataError, match="toy_train_imagebind.h5: dataset 'toy' is none of the official"):
        data.load_dns_features(str(tmp_path), [("toy", "text", "audio")], "imagebind")
    write_h5(tmp_path / "tvl_train_imagebind.h5", {"a": rng.standard_normal((3, D))})
    with pytest.raises(data.DataError, match="tvl_train_imagebind.h5: missing modality array 'audio'"):
        data.load_dns_features(str(tmp_path), [("tvl", "text", "audio")], "imagebind")


def test_missing_files_name_both_and_missing_h5py_says_pip_install(tmp_path, monkeypatch):
    with pytest.raises(data.DataError, match=r"esc50_train.npz: file not found, nor .*esc50_train_unibind.h5"):
        data.load_dns_features(str(tmp_path), [("esc50", "text", "audio")], "unibind")
    (tmp_path / "esc50_train_unibind.h5").write_bytes(b"not read")
    monkeypatch.setitem(sys.modules, "h5py", None)  # import h5py now raises ImportError
    with pytest.raises(data.DataError, match="esc50_train_unibind.h5: .*pip install h5py"):
        data.load_dns_features(str(tmp_path), [("esc50", "text", "audio")], "unibind")


def test_npz_data_may_name_modalities_freely(tmp_path):
    steps = data.parse_dns_steps(["digits:image-caption", "digits:audio_2-caption"])
    assert steps == [("digits", "image", "caption"), ("digits", "audio_2", "caption")]
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        np.savez(tmp_path / f"digits_{split}.npz", caption=rng.standard_normal((10, 4)),
                 image=rng.standard_normal((10, 6)), audio_2=rng.standard_normal((10, 3)),
                 text=rng.standard_normal((10, 4)))
    got = data.load_dns_features(str(tmp_path), steps)
    assert list(got["digits"]["train"]["feats"]) == ["text", "audio_2", "caption", "image"]  # global order first
    assert got["digits"]["test"]["feats"]["image"].shape == (10, 6)
    for item in ("digits:image-cap-tion", "digits:image-capti.on", "digits:image-image"):
        with pytest.raises(data.DataError, match=f"--steps item '{item}'"):
            data.parse_dns_steps([item])
    np.savez(tmp_path / "digits_test.npz", **{"caption": np.zeros((10, 4)), "image": np.zeros((10, 6)),
                                               "bad-name": np.zeros((10, 2))})
    with pytest.raises(data.DataError, match=r"digits_test.npz: unknown array\(s\) \['bad-name'\]"):
        data.load_dns_features(str(tmp_path), [("digits", "image", "caption")])
